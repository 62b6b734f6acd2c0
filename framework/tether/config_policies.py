"""Governance policies of outbound calls: retry, circuit breaker, rate limiter, fallback codes.

Every section has defaults under ``client``; ``client.services.<name>`` overrides them for one
dependency and ``client.services.<name>.methods.<pattern>`` for some of its methods. An override
names only the fields it changes. :class:`PolicyResolver` merges them into one immutable
:class:`CallPolicy` per method, once; merges are checked when the configuration is loaded.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Annotated, Literal, Self, TypeVar, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import NoDecode

from tether.config_tls import ClientTlsOverride

__all__ = [
    "BreakerConfig",
    "CallPolicy",
    "LimiterConfig",
    "MethodPattern",
    "MethodPolicy",
    "PolicyResolver",
    "RetryConfig",
    "ServicePolicy",
    "StatusName",
    "StatusNames",
    "split_names",
    "upper_status_names",
]


def split_names(value: object) -> object:
    """Accept a comma-separated string (as environment variables carry lists) or a JSON array."""
    if not isinstance(value, str):
        return value
    try:
        decoded = json.loads(value)
    except ValueError:
        decoded = None
    if isinstance(decoded, list):
        return decoded
    return [part.strip() for part in value.split(",") if part.strip()]


#: gRPC status names a policy may name; OK is left out (a success is never retried or failed).
#: Spelled out here so configuration needs no grpc import; a test pins it to grpc.StatusCode.
StatusName = Literal[
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
]
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_METHOD_PATTERN = re.compile(rf"^(?:{_IDENT}\.)*{_IDENT}/(?:\*|{_IDENT})$")


def _check_method_pattern(value: str) -> str:
    if not _METHOD_PATTERN.match(value):
        raise ValueError("must be 'package.Service/Method' or 'package.Service/*'")
    return value


MethodPattern = Annotated[str, AfterValidator(_check_method_pattern)]


#: A list of status names in configuration (a comma list or a JSON array in the environment).
StatusNames = Annotated[tuple[StatusName, ...], NoDecode]


class RetryConfig(BaseModel):
    """Retries of outbound unary calls, with gRFC A6 semantics (backoff, throttling, pushback)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_attempts: int = Field(
        default=3,
        ge=1,
        le=5,
        description="Attempts per call, the first included; 1 turns retries off.",
    )
    initial_backoff_seconds: float = Field(
        default=0.1, gt=0, description="Upper bound of the first retry's random delay."
    )
    max_backoff_seconds: float = Field(
        default=1.0, gt=0, description="Upper bound of any retry's random delay."
    )
    backoff_multiplier: float = Field(
        default=2.0, gt=0, description="Growth of the delay bound from one retry to the next."
    )
    retryable_status_codes: StatusNames = Field(
        default=("UNAVAILABLE",),
        description=(
            "Status names that are retried, e.g. UNAVAILABLE; in the environment a "
            "comma-separated list or a JSON array."
        ),
    )
    max_tokens: float = Field(
        default=10.0,
        gt=0,
        le=1000,
        description="Retry throttling: size of the token bucket; retries stop at half of it.",
    )
    token_ratio: float = Field(
        default=0.1,
        gt=0,
        le=1,
        description="Retry throttling: tokens a success puts back (a failure takes one).",
    )

    @field_validator("retryable_status_codes", mode="before")
    @classmethod
    def _upper_codes(cls, value: object) -> object:
        return upper_status_names(value)

    @model_validator(mode="after")
    def _check_backoff(self) -> Self:
        if self.max_backoff_seconds < self.initial_backoff_seconds:
            raise ValueError(
                f"max_backoff_seconds ({self.max_backoff_seconds}) must be >= "
                f"initial_backoff_seconds ({self.initial_backoff_seconds})"
            )
        return self


#: Status codes that say "the caller asked for something wrong", never "the dependency is
#: failing": they never trip a breaker, whatever the configuration says.
NEVER_FAILURES = frozenset(
    {
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "FAILED_PRECONDITION",
    }
)


def upper_status_names(value: object) -> object:
    """A validator's input, with known status names upper-cased (a list from the environment
    split first); an unknown name is left as written, so the refusal shows it as given."""
    value = split_names(value)
    if not isinstance(value, list | tuple):
        return value
    # Only a known name is upper-cased, so a refused one is shown as it was written.
    known = get_args(StatusName)
    return [v.upper() if isinstance(v, str) and v.upper() in known else v for v in value]


class BreakerConfig(BaseModel):
    """A circuit breaker per (service, method): open after failures, probe, close."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(default=True, description="Guard calls with a circuit breaker.")
    fail_max: int = Field(
        default=5, ge=1, le=10_000, description="Consecutive failures that open the breaker."
    )
    reset_timeout_seconds: float = Field(
        default=10.0, gt=0, description="Time an open breaker fails fast before probing."
    )
    half_open_probes: int = Field(
        default=1, ge=1, le=1000, description="Calls let through at once while half-open."
    )
    success_threshold: int = Field(
        default=1, ge=1, le=1000, description="Probe successes that close the breaker again."
    )
    failure_codes: StatusNames = Field(
        default=("UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL", "UNKNOWN", "DATA_LOSS"),
        description="Status names that count as failures of the dependency.",
    )

    @field_validator("failure_codes", mode="before")
    @classmethod
    def _upper_codes(cls, value: object) -> object:
        return upper_status_names(value)

    @field_validator("failure_codes")
    @classmethod
    def _no_caller_errors(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        wrong = sorted(set(value) & NEVER_FAILURES)
        if wrong:
            raise ValueError(
                f"{', '.join(wrong)} cannot count as failures: such codes report the caller's "
                "mistake, not a failing dependency; allowed: any other status name"
            )
        return value


def bucket_capacity(rate: float | None, burst: int | None) -> int:
    """A token bucket's size: ``burst`` if given, else one second's worth of ``rate`` (>= 1)."""
    if burst is not None:
        return burst
    return max(1, int(rate or 1))


class LimiterConfig(BaseModel):
    """A token bucket per dependency: at most ``rate`` calls a second, ``burst`` at once."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rate: float | None = Field(
        default=None, gt=0, description="Calls per second allowed; None means no limit."
    )
    burst: int | None = Field(
        default=None,
        ge=1,
        description="Calls allowed at once above the rate; None: rate, at least 1.",
    )
    max_wait_seconds: float = Field(
        default=0.0,
        ge=0,
        description="How long a call may wait for a token; after that it is refused locally.",
    )

    @property
    def capacity(self) -> int:
        """The bucket's size."""
        return bucket_capacity(self.rate, self.burst)


class MethodPolicy(BaseModel):
    """Overrides for some methods of one dependency; only the fields given change."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    timeout_seconds: float | None = Field(default=None, gt=0, description="Default deadline.")
    idempotent: bool | None = Field(
        default=None,
        description="Safe to retry after it reached a server; None: as the proto says.",
    )
    retry: RetryConfig | None = Field(default=None, description="Retry overrides.")
    breaker: BreakerConfig | None = Field(default=None, description="Breaker overrides.")
    fallback_codes: StatusNames | None = Field(
        default=None, description="Status names on which a declared fallback answers."
    )

    @field_validator("fallback_codes", mode="before")
    @classmethod
    def _upper_codes(cls, value: object) -> object:
        return upper_status_names(value)


class ServicePolicy(MethodPolicy):
    """Overrides for one dependency (by the name it is dialled with), and for its methods."""

    limiter: LimiterConfig | None = Field(default=None, description="The dependency's limiter.")
    tls: ClientTlsOverride | None = Field(
        default=None, description="TLS to this dependency; the fields given replace client.tls's."
    )
    methods: dict[MethodPattern, MethodPolicy] = Field(
        default_factory=dict,
        description="Per-method overrides: 'package.Service/Method' or 'package.Service/*'.",
    )


@dataclass(frozen=True, slots=True)
class CallPolicy:
    """Everything the client chain needs to know about one method of one dependency."""

    timeout_seconds: float
    idempotent: bool | None
    retry: RetryConfig
    breaker: BreakerConfig
    fallback_codes: frozenset[str]


_M = TypeVar("_M", bound=BaseModel)


def merge(base: _M, override: BaseModel | None) -> _M:
    """``base`` with the fields ``override`` sets explicitly, validated again as a whole.

    Raises:
        pydantic.ValidationError: the merged section breaks a rule (e.g. max < initial).
    """
    if override is None:
        return base
    changes = override.model_dump(exclude_unset=True)
    if not changes:
        return base
    return type(base).model_validate({**base.model_dump(), **changes})


class PolicyResolver:
    """Resolves the policy of each method of one dependency, once per method.

    Args:
        defaults: the ``client`` section's own values (timeout, retry, breaker, fallback codes).
        service: the dependency's overrides, if any.
    """

    def __init__(
        self,
        *,
        timeout_seconds: float,
        retry: RetryConfig,
        breaker: BreakerConfig,
        fallback_codes: tuple[str, ...],
        service: ServicePolicy | None = None,
    ) -> None:
        self._service = service or ServicePolicy()
        base = _apply(
            CallPolicy(
                timeout_seconds=timeout_seconds,
                idempotent=None,
                retry=retry,
                breaker=breaker,
                fallback_codes=frozenset(fallback_codes),
            ),
            self._service,
        )
        self._base = base
        self._cache: dict[str, CallPolicy] = {}

    @property
    def limiter(self) -> LimiterConfig:
        """The dependency's limiter settings."""
        return self._service.limiter or LimiterConfig()

    def check(self) -> None:
        """Merge every method override now, so a bad combination fails at start-up.

        Raises:
            pydantic.ValidationError: a merged section breaks a rule.
        """
        for override in self._service.methods.values():
            _apply(self._base, override)

    def policy(self, full_method: str) -> CallPolicy:
        """The policy of ``package.Service/Method`` (no leading slash)."""
        found = self._cache.get(full_method)
        if found is None:
            service = full_method.partition("/")[0]
            policy = self._base
            for pattern in (f"{service}/*", full_method):  # the most specific wins
                override = self._service.methods.get(pattern)
                if override is not None:
                    policy = _apply(policy, override)
            found = policy
            if len(self._cache) < 10_000:  # method names come from code, but stay bounded
                self._cache[full_method] = found
        return found


def _apply(policy: CallPolicy, override: MethodPolicy) -> CallPolicy:
    return CallPolicy(
        timeout_seconds=override.timeout_seconds or policy.timeout_seconds,
        idempotent=policy.idempotent if override.idempotent is None else override.idempotent,
        retry=merge(policy.retry, override.retry),
        breaker=merge(policy.breaker, override.breaker),
        fallback_codes=(
            policy.fallback_codes
            if override.fallback_codes is None
            else frozenset(override.fallback_codes)
        ),
    )


def first_problem(exc: ValidationError) -> str:
    """The first error of ``exc`` in one line, for a merge refused at start-up."""
    error = exc.errors(include_url=False)[0]
    return str(error.get("msg", exc))


# --------------------------------------------------------------------------- server admission


class AdmissionLimits(BaseModel):
    """Admission limits of one server method; in an override only the fields given change."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_concurrent: int | None = Field(
        default=None,
        ge=1,
        description="Calls of the method served at once; None means no bound.",
    )
    rate: float | None = Field(
        default=None,
        gt=0,
        description="Calls of the method admitted per second; None means no limit.",
    )
    burst: int | None = Field(
        default=None,
        ge=1,
        description="Calls admitted at once above the rate; needs rate; None: rate, at least 1.",
    )
    retry_after_seconds: float = Field(
        default=1.0,
        ge=0,
        le=3600,
        description=(
            "Delay suggested to a caller refused for concurrency (sent as RetryInfo); a caller "
            "refused by the rate is told when the next call would be admitted instead."
        ),
    )

    @property
    def capacity(self) -> int:
        """The size of the method's token bucket."""
        return bucket_capacity(self.rate, self.burst)

    @property
    def limited(self) -> bool:
        """Whether any limit applies."""
        return self.max_concurrent is not None or self.rate is not None


class AdmissionConfig(AdmissionLimits):
    """Server admission control: limits for every method, with overrides for some of them.

    The fields outside ``methods`` apply to each method separately (every method has its own
    counter and bucket); an entry of ``methods`` changes only the fields it names, and
    ``package.Service/Method`` wins over ``package.Service/*``. No limits by default.
    """

    methods: dict[MethodPattern, AdmissionLimits] = Field(
        default_factory=dict,
        description="Per-method overrides: 'package.Service/Method' or 'package.Service/*'.",
    )

    @model_validator(mode="after")
    def _check_burst_has_rate(self) -> Self:
        # Checked on the merged limits, so an override may give a burst to a default rate; a
        # burst with no rate at all would silently do nothing, so it is refused.
        if self.burst is not None and self.rate is None:
            raise ValueError("burst is set without rate; set rate too, or remove burst")
        for pattern, override in self.methods.items():
            if "burst" in override.model_fields_set and self.limits(pattern).rate is None:
                raise ValueError(
                    f"methods.{pattern}: burst is set but no rate applies to it; "
                    "set rate too, or remove burst"
                )
        return self

    @property
    def defaults(self) -> AdmissionLimits:
        """The limits of a method no override names."""
        return AdmissionLimits.model_validate(self.model_dump(exclude={"methods"}))

    @property
    def limited(self) -> bool:
        """Whether any method has a limit."""
        return super().limited or any(o.limited for o in self.methods.values())

    def limits(self, method: str) -> AdmissionLimits:
        """The limits of ``package.Service/Method`` (no leading slash), overrides applied."""
        found = self.defaults
        service = method.partition("/")[0]
        for pattern in (f"{service}/*", method):  # the most specific wins
            override = self.methods.get(pattern)
            if override is not None:
                found = merge(found, override)
        return found


__all__ += ["AdmissionConfig", "AdmissionLimits"]
