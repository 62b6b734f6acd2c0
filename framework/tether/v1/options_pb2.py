"""``tether/v1/options.proto`` registered at import: the method option holding a static fallback.

Written by hand, not generated. protoc's output pins the protobuf runtime to at least the
version of the grpcio-tools that made it, and every tether service imports this module; this
one works on any supported protobuf. ``tests/unit/test_codegen.py`` checks that it describes
exactly what ``protos/tether/v1/options.proto`` says.
"""

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.internal import builder as _builder

_FILE = descriptor_pb2.FileDescriptorProto(
    name="tether/v1/options.proto",
    package="tether.v1",
    dependency=["google/protobuf/descriptor.proto"],
    syntax="proto3",
    extension=[
        descriptor_pb2.FieldDescriptorProto(
            name="fallback",
            number=50100,
            label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
            type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
            extendee=".google.protobuf.MethodOptions",
            json_name="fallback",
        )
    ],
)

DESCRIPTOR = descriptor_pool.Default().AddSerializedFile(_FILE.SerializeToString())

_globals = globals()
_builder.BuildMessageAndEnumDescriptors(DESCRIPTOR, _globals)
_builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, "tether.v1.options_pb2", _globals)
