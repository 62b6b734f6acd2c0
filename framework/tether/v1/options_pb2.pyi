from google.protobuf import descriptor as _descriptor

DESCRIPTOR: _descriptor.FileDescriptor
FALLBACK_FIELD_NUMBER: int
fallback: _descriptor.FieldDescriptor
