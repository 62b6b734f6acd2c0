"""tether.codegen: tether's own protos on the include path, and their shipped modules in step."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool

from tether.codegen import PROTO_DIR, compile_if_stale, compile_protos
from tether.v1 import options_pb2

OPTIONS = PROTO_DIR / "tether" / "v1" / "options.proto"

USER_PROTO = """
syntax = "proto3";
package fbdemo.v1;
import "tether/v1/options.proto";
service Users {
  rpc Get(GetRequest) returns (User) {
    option (tether.v1.fallback) = "name: \\"unknown\\"";
  }
}
message GetRequest { string id = 1; }
message User { string name = 1; }
"""


def test_shipped_options_module_describes_options_proto(tmp_path: Path) -> None:
    """tether/v1/options_pb2 registers exactly the descriptor protoc makes of options.proto.

    The module is written by hand (generated code pins the protobuf runtime to the generator's
    version); if this fails, update its FileDescriptorProto to match the .proto file.
    """
    out = tmp_path / "descriptor.bin"
    from grpc_tools import protoc

    include = Path(protoc.__file__).parent / "_proto"
    status = protoc.main(
        ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--descriptor_set_out={out}", str(OPTIONS)]
    )
    assert status == 0
    [fresh] = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    shipped = descriptor_pb2.FileDescriptorProto()
    options_pb2.DESCRIPTOR.CopyToProto(shipped)
    assert shipped == fresh, "framework/tether/v1/options_pb2.py no longer matches options.proto"


def test_the_option_has_its_documented_number() -> None:
    """(tether.v1.fallback) is field 50100 of MethodOptions, in the private-use range."""
    assert options_pb2.fallback.number == 50100
    assert options_pb2.fallback.containing_type.full_name == "google.protobuf.MethodOptions"
    assert "50100" in OPTIONS.read_text()


def test_user_protos_import_tether_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A user proto imports tether/v1/options.proto; its module uses the one tether ships."""
    root = tmp_path / "proto"
    (root / "fbdemo" / "v1").mkdir(parents=True)
    source = root / "fbdemo" / "v1" / "users.proto"
    source.write_text(USER_PROTO)
    out = tmp_path / "gen"
    generated = compile_protos([source], out, proto_path=root)
    assert {p.relative_to(out).as_posix() for p in generated} == {
        "fbdemo/v1/users_pb2.py",
        "fbdemo/v1/users_pb2.pyi",
        "fbdemo/v1/users_pb2_grpc.py",
    }
    assert not (out / "tether").exists()
    monkeypatch.syspath_prepend(str(out))
    module = importlib.import_module("fbdemo.v1.users_pb2")
    assert module is not None
    method = descriptor_pool.Default().FindMethodByName("fbdemo.v1.Users.Get")
    assert method.GetOptions().Extensions[options_pb2.fallback] == 'name: "unknown"'


def test_a_vendored_copy_of_tether_options_is_not_generated(tmp_path: Path) -> None:
    """tether/v1 protos among a user's sources never become modules in the user's tree."""
    root = tmp_path / "proto"
    (root / "tether" / "v1").mkdir(parents=True)
    vendored = root / "tether" / "v1" / "options.proto"
    vendored.write_text(OPTIONS.read_text())
    out = tmp_path / "gen"
    assert compile_protos([vendored], out, proto_path=root) == []
    assert list(out.iterdir()) == []


def test_compile_if_stale_compiles_only_what_changed(tmp_path: Path) -> None:
    """Missing outputs are generated, fresh ones left alone, an edited proto regenerated."""
    root = tmp_path / "proto"
    (root / "shop" / "v1").mkdir(parents=True)
    source = root / "shop" / "v1" / "shop.proto"
    source.write_text('syntax = "proto3";\npackage shop.v1;\nmessage Item { string id = 1; }\n')
    out = tmp_path / "gen"
    first = compile_if_stale(root, out)
    assert [p.name for p in first] == ["shop_pb2.py", "shop_pb2.pyi", "shop_pb2_grpc.py"]
    assert compile_if_stale(root, out) == []
    later = max(p.stat().st_mtime_ns for p in first) + 1_000_000_000
    os.utime(source, ns=(later, later))
    assert compile_if_stale(root, out) == first
