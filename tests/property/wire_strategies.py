"""Hypothesis strategies for what a caller can put in gRPC metadata: trace headers, baggage,
custom keys, binary values; near-valid as often as junk, so parsers are pushed at their edges.

Only what grpc's own client sends is generated: keys of ``[a-z0-9_.-]``, text values of
printable ASCII (0x20-0x7E), bytes for ``-bin`` keys. Anything else grpc refuses before it
leaves the caller, so a server never sees it.
"""

from __future__ import annotations

from hypothesis import strategies as st

#: The characters grpc allows in a text metadata value.
PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F))
_HEX = "0123456789abcdef"
# Near-hex: mostly valid digits, sometimes a character the W3C format refuses.
_NEAR_HEX = _HEX + "ABFx-. "


def _hex_field(size: int) -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(_HEX, min_size=size, max_size=size),
        st.just("0" * size),
        st.text(_NEAR_HEX, min_size=max(0, size - 1), max_size=size + 1),
    )


def traceparents(*, tabs: bool = False) -> st.SearchStrategy[str]:
    """``traceparent`` values: valid, near-valid (bad version, zero ids, extra fields, spaces,
    wrong lengths, upper case) and arbitrary printable text, up to past the 512 limit.

    With ``tabs``, also tabs around it (which W3C allows, but grpc never sends).
    """
    space = ["", " ", "  ", *(["\t", " \t"] if tabs else [])]
    near = st.builds(
        lambda pre, version, trace, span, flags, extra, post: (
            f"{pre}{version}-{trace}-{span}-{flags}{extra}{post}"
        ),
        st.sampled_from(space),
        st.one_of(st.sampled_from(["00", "01", "cc", "ff", "0"]), _hex_field(2)),
        _hex_field(32),
        _hex_field(16),
        st.one_of(st.sampled_from(["00", "01", "03", "ff"]), _hex_field(2)),
        st.one_of(st.just(""), st.text(PRINTABLE, max_size=40).map(lambda s: "-" + s)),
        st.sampled_from([*space, "x"]),
    )
    valid = st.builds(
        lambda trace, span, flags: f"00-{trace:032x}-{span:016x}-{flags}",
        st.integers(1, 2**128 - 1),
        st.integers(1, 2**64 - 1),
        st.sampled_from(["00", "01"]),
    )
    long = st.integers(480, 600).map(lambda n: ("00-" + "a" * 32 + "-" + "b" * 16 + "-01-")[:n])
    return st.one_of(
        valid, near, st.text(PRINTABLE, max_size=120), long.map(lambda s: s.ljust(530, "f"))
    )


def tracestates() -> st.SearchStrategy[str]:
    """``tracestate`` values: list members (``key=value``, ``tenant@system=value``), junk
    between them, and lengths around the 512 limit."""
    key = st.one_of(
        st.from_regex(r"[a-z][a-z0-9_\-*/]{0,20}", fullmatch=True),
        st.from_regex(r"[a-z0-9][a-z0-9_\-*/]{0,10}@[a-z][a-z0-9_\-*/]{0,5}", fullmatch=True),
        st.text(PRINTABLE, max_size=12),
    )
    value = st.text(PRINTABLE.replace(",", "").replace("=", ""), max_size=40)
    member = st.builds(lambda k, v: f"{k}={v}", key, value)
    members = st.lists(st.one_of(member, st.text(PRINTABLE, max_size=10)), max_size=40)
    valid = st.lists(
        st.builds(
            lambda k, v: f"{k}={v}",
            st.from_regex(r"[a-z][a-z0-9_\-*/]{0,8}", fullmatch=True),
            st.from_regex(r"[!-+\--<>-~]{1,8}", fullmatch=True),
        ),
        min_size=1,
        max_size=4,
        unique_by=lambda m: m.partition("=")[0],
    ).map(",".join)
    return st.one_of(
        valid,
        members.map(",".join),
        st.integers(500, 700).map(lambda n: ("vendor=" + "v" * n)[:n]),
        st.text(PRINTABLE, max_size=100),
    )


def baggages() -> st.SearchStrategy[str]:
    """``baggage`` values: entries with properties, percent-encoding good and bad, and sizes
    past the 8 KiB W3C limit."""
    token = st.text(PRINTABLE.translate(str.maketrans("", "", ",;= ")), max_size=20)
    encoded = st.one_of(token, st.sampled_from(["%20", "%zz", "%", "%e2%82%ac", "%ff"]))
    entry = st.builds(
        lambda k, v, props: f"{k}={v}" + "".join(f";{p}" for p in props),
        token,
        st.lists(encoded, max_size=3).map("".join),
        st.lists(st.one_of(token, st.builds(lambda a, b: f"{a}={b}", token, token)), max_size=2),
    )
    return st.one_of(
        st.lists(st.one_of(entry, st.text(PRINTABLE, max_size=12)), max_size=20).map(",".join),
        st.integers(8000, 9000).map(lambda n: ("k=" + "v" * n)[:n]),
        st.text(PRINTABLE, max_size=200),
    )


def grpc_timeouts() -> st.SearchStrategy[str]:
    """``grpc-timeout`` as a caller might type it: digits and a unit, or not."""
    unit = st.sampled_from([*"HMSmunx", ""])
    return st.one_of(
        st.builds(lambda n, u: f"{n}{u}", st.integers(-5, 10**10), unit),
        st.text(PRINTABLE, max_size=12),
    )


def custom_keys() -> st.SearchStrategy[str]:
    """Keys a caller may send besides the well-known ones (never ``-bin``)."""
    plain = st.from_regex(r"[a-z0-9_.-]{1,40}", fullmatch=True).filter(
        lambda k: not k.endswith("-bin") and k != "grpc-status"  # grpc's client crashes on it
    )
    named = st.sampled_from(
        [
            "x-request-id",
            "authorization",
            "cookie",
            "x-api-key",
            "user-agent",
            "content-type",
            "te",
            "host",
            "grpc-encoding",
            "grpc-accept-encoding",
            "grpc-message",
            "grpc-previous-rpc-attempts",
            "tether-fallback",
        ]
    )
    return st.one_of(plain, named)


def metadata() -> st.SearchStrategy[list[tuple[str, str | bytes]]]:
    """Inbound metadata: any mix (and repeats) of trace headers, custom text and binary keys."""
    pair = st.one_of(
        st.tuples(st.just("traceparent"), traceparents()),
        st.tuples(st.just("tracestate"), tracestates()),
        st.tuples(st.just("baggage"), baggages()),
        st.tuples(st.just("grpc-timeout"), grpc_timeouts()),
        st.tuples(custom_keys(), st.text(PRINTABLE, max_size=300)),
        st.tuples(custom_keys().map(lambda k: k + "-bin"), st.binary(max_size=300)),
    )
    return st.lists(pair, max_size=8)


def metadata_size(pairs: list[tuple[str, str | bytes]]) -> int:
    """The size grpc counts for these pairs (name + value + 32 per entry; binary values
    decoded), before its own headers (path, authority, user agent...), about 550 bytes."""
    return sum(len(key) + len(value) + 32 for key, value in pairs)
