"""tether.codegen: tether's own protos on the include path, and their shipped modules in step."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool

from tether import codegen
from tether.codegen import GRPC_STUB_PLUGIN, PROTO_DIR, compile_if_stale, compile_protos
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
        "fbdemo/v1/users_pb2_grpc.pyi",
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
    assert [p.name for p in first] == [
        "shop_pb2.py",
        "shop_pb2.pyi",
        "shop_pb2_grpc.py",
        "shop_pb2_grpc.pyi",
    ]
    assert compile_if_stale(root, out) == []
    later = max(p.stat().st_mtime_ns for p in first) + 1_000_000_000
    os.utime(source, ns=(later, later))
    assert compile_if_stale(root, out) == first


#: A client and a servicer of USER_PROTO as a service's code would write them.
TYPED_CALLER = """
from __future__ import annotations

import grpc

from fbdemo.v1 import users_pb2, users_pb2_grpc


class Users(users_pb2_grpc.UsersServicer):
    async def Get(
        self, request: users_pb2.GetRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> users_pb2.User:
        return users_pb2.User(name=request.id)


async def name_of(channel: grpc.aio.Channel, user_id: str) -> str:
    stub: users_pb2_grpc.UsersAsyncStub = users_pb2_grpc.UsersStub(channel)
    user = await stub.Get(users_pb2.GetRequest(id=user_id), timeout=1.0)
    return user.name
"""


def _mypy_strict(tmp_path: Path, out: Path, code: str) -> subprocess.CompletedProcess[str]:
    """mypy --strict on ``code`` with ``out`` importable, as a service's `make lint` runs it."""
    module = tmp_path / "caller.py"
    module.write_text(textwrap.dedent(code))
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(module)],
        cwd=tmp_path,
        env={**os.environ, "MYPYPATH": str(out)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.slow
def test_grpc_type_stubs_type_the_async_stub_and_the_servicer(tmp_path: Path) -> None:
    """The generated *_pb2_grpc.pyi declares UsersAsyncStub and a typed servicer: mypy --strict
    accepts awaiting its calls and subclassing the servicer, and refuses awaiting the sync stub
    (with untyped modules both would pass, as Any)."""
    root = tmp_path / "proto"
    (root / "fbdemo" / "v1").mkdir(parents=True)
    (root / "fbdemo" / "v1" / "users.proto").write_text(USER_PROTO)
    out = tmp_path / "gen"
    compile_protos([root / "fbdemo" / "v1" / "users.proto"], out, proto_path=root)
    assert "class UsersAsyncStub(UsersStub):" in (out / "fbdemo/v1/users_pb2_grpc.pyi").read_text()

    typed = _mypy_strict(tmp_path, out, TYPED_CALLER)
    assert typed.returncode == 0, typed.stdout + typed.stderr

    sync = TYPED_CALLER.replace(
        "stub: users_pb2_grpc.UsersAsyncStub", "stub: users_pb2_grpc.UsersStub"
    )
    refused = _mypy_strict(tmp_path, out, sync)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert 'Incompatible types in "await" (actual type "User"' in refused.stdout


def test_without_mypy_protobuf_the_modules_are_written_untyped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No plugin: no *_pb2_grpc.pyi (a stale one is removed, so it cannot describe a changed
    service), and compile_if_stale does not take its absence for staleness."""
    root = tmp_path / "proto"
    (root / "fbdemo" / "v1").mkdir(parents=True)
    (root / "fbdemo" / "v1" / "users.proto").write_text(USER_PROTO)
    out = tmp_path / "gen"
    stub = out / "fbdemo" / "v1" / "users_pb2_grpc.pyi"
    assert stub in compile_if_stale(root, out)

    monkeypatch.setattr(codegen, "_find_plugin", lambda: None)
    generated = compile_protos([root / "fbdemo" / "v1" / "users.proto"], out, proto_path=root)
    assert stub not in generated
    assert not stub.exists()
    assert compile_if_stale(root, out) == []


def test_the_plugin_runs_from_its_entry_point_when_no_script_is_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An install without console scripts (pip --target): the entry point is run by this
    interpreter through a temporary wrapper, which is gone afterwards."""
    [entry] = importlib.metadata.entry_points(group="console_scripts", name=GRPC_STUB_PLUGIN)
    monkeypatch.setattr(codegen, "_find_plugin", lambda: entry)
    with codegen._plugin_executable() as wrapper:
        assert wrapper is not None
        assert wrapper.read_text().startswith(f"#!{sys.executable}\n")
    assert not wrapper.exists()

    root = tmp_path / "proto"
    (root / "fbdemo" / "v1").mkdir(parents=True)
    (root / "fbdemo" / "v1" / "users.proto").write_text(USER_PROTO)
    compile_protos([root / "fbdemo" / "v1" / "users.proto"], tmp_path / "gen", proto_path=root)
    assert "class UsersAsyncStub" in (tmp_path / "gen/fbdemo/v1/users_pb2_grpc.pyi").read_text()
