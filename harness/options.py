"""Every option of the harness, declared once: flag, ini name, choices, default and help.

The pytest plugin, the command line (``afterclose run|explore|demo``), ``Settings`` and the
replay commands all read this table, so a choice or a default is changed in one place.  Each
option's ``parse`` checks a value and raises :class:`~afterclose.harness.errors.OptionError`;
the plugin turns that into ``pytest.UsageError``, the command line into argparse's error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from afterclose.harness.errors import OptionError

T = TypeVar("T", covariant=True)

RUNNER_CHOICES = ("process", "docker")
TRACER_CHOICES = ("auto", "preload", "ebpf", "off")
SANITIZE_CHOICES = ("none", "address", "undefined")
CHAOS_LEVELS = ("off", "on", "low", "medium", "high")
CHAOS_CHOICES = (*CHAOS_LEVELS, *map(str, range(11)))
SEED_LIMIT = 2**64  # seeds are unsigned 64-bit numbers


@dataclass(frozen=True)
class Option(Generic[T]):
    """One option.  ``parse(value, flag)`` checks a value given as ``flag`` (the spelling the
    user typed: ``cli_flag`` on the command line) and returns it converted.  ``about`` may
    name ``{choices}`` and ``{default}``: :attr:`help` fills them in."""

    flag: str
    ini: str
    parse: Callable[[str, str], T]
    about: str
    default: T
    choices: tuple[str, ...] = ()
    cli_flag: str | None = None  # the command line's spelling, when it differs

    @property
    def dest(self) -> str:
        """The attribute name argparse and pytest give the value."""
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def cli(self) -> str:
        return self.cli_flag or self.flag

    @property
    def help(self) -> str:
        return self.about.format(choices=", ".join(self.choices), default=self.default)

    def check(self, value: str, flag: str | None = None) -> T:
        return self.parse(value, flag or self.flag)


def one_of(flag: str, ini: str, choices: tuple[str, ...], about: str, default: str) -> Option[str]:
    """An option whose value is one of ``choices``."""
    return Option(flag, ini, choice(choices), about, default=default, choices=choices)


def choice(choices: tuple[str, ...]) -> Callable[[str, str], str]:
    def parse(value: str, flag: str) -> str:
        if value not in choices:
            raise OptionError(f"{flag}={value!r} is not valid; choose one of: {', '.join(choices)}")
        return value

    return parse


def _not_empty(what: str) -> Callable[[str, str], str | None]:
    def parse(value: str, flag: str) -> str | None:
        if not value.strip():
            raise OptionError(f"{flag} is empty; give {what}")
        return value.strip()

    return parse


def _chaos(value: str, flag: str) -> str:
    if value in CHAOS_CHOICES:
        return value
    raise OptionError(
        f"{flag}={value!r} is not valid; use off, on, low, medium, high or a level 0-10"
    )


def seed(value: str, flag: str = "--fault-seed") -> int | None:
    """A fault seed: a whole number from 0 to 2**64-1 (decimal, or 0x... hex)."""
    try:
        number = int(value, 0)
    except ValueError:
        raise OptionError(
            f"{flag}={value!r} is not a whole number (the seed a failure report printed)"
        ) from None
    if not 0 <= number < SEED_LIMIT:
        raise OptionError(f"{flag}={value!r} must be between 0 and 2**64-1")
    return number


def _seconds_between(low: float, high: float, meaning: str) -> Callable[[str, str], float | None]:
    def parse(value: str, flag: str) -> float | None:
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if not low <= seconds <= high:
            raise OptionError(
                f"{flag}={value!r} is not valid; give seconds between {low:g} and {high:g} "
                f"({meaning})"
            )
        return seconds

    return parse


TARGET: Option[str | None] = Option(
    "--target",
    "afterclose_target",
    _not_empty("a target name or a manifest path"),
    "target to test: a name (targets/NAME.toml, targets/NAME/target.toml, or built-in) "
    "or a path to a manifest",
    default=None,
)
RUNNER = one_of(
    "--runner",
    "afterclose_runner",
    RUNNER_CHOICES,
    "where the target runs: {choices} (default: {default})",
    default="process",
)
TRACER = one_of(
    "--tracer",
    "afterclose_tracer",
    TRACER_CHOICES,
    "fd-lifecycle tracer: {choices} (default: {default})",
    default="auto",
)
KERNEL: Option[str | None] = Option(
    "--kernel",
    "afterclose_kernel",
    _not_empty("a version such as 6.12, or a path"),
    "run the tests inside qemu guests booted on other Linux kernels: versions (6.1,6.12),"
    " Debian package names, .deb files or kernel image paths, comma-separated",
    default=None,
)
KERNEL_TIMEOUT: Option[float | None] = Option(
    "--kernel-timeout",
    "afterclose_kernel_timeout",
    _seconds_between(10, 86_400, "the time limit of one kernel's whole guest run"),
    "time limit in seconds of one kernel's guest run (default: 600 + 120 per test)",
    default=None,
)
CHAOS: Option[str] = Option(
    "--chaos",
    "afterclose_chaos",
    _chaos,
    "schedule perturbation in the target: off, on, low, medium, high or 0-10 (default: {default})",
    default="off",
    choices=CHAOS_CHOICES,
)
FAULT_SEED: Option[int | None] = Option(
    "--fault-seed",
    "afterclose_fault_seed",
    seed,
    "seed of the client-side fault schedule (default: random, printed in the header)",
    default=None,
    cli_flag="--seed",
)
SANITIZE = one_of(
    "--sanitize",
    "afterclose_sanitize",
    SANITIZE_CHOICES,
    "build [compile] targets with a sanitizer: {choices} (default: {default})",
    default="none",
)
STORM_DURATION: Option[float | None] = Option(
    "--storm-duration",
    "afterclose_storm_duration",
    _seconds_between(0.1, 3600, "how long every storm of the suite keeps opening connections"),
    "stretch every storm (connection_storm, the idle scenario's churn, netem's) to at least "
    "SECONDS, at its own rate: reaches bugs that need time, such as idle timers "
    "(default: each storm's own duration)",
    default=None,
)

# In the order pytest --help lists them.
OPTIONS: tuple[Option[object], ...] = (
    TARGET,
    RUNNER,
    TRACER,
    KERNEL,
    KERNEL_TIMEOUT,
    CHAOS,
    FAULT_SEED,
    SANITIZE,
    STORM_DURATION,
)
# What a run of a target depends on besides the target, in the order replay commands name
# them (after --target and the seed); the command line has all but --kernel.
RUN_OPTIONS: tuple[Option[object], ...] = (
    RUNNER,
    TRACER,
    SANITIZE,
    CHAOS,
    KERNEL,
    STORM_DURATION,
)
CLI_RUN_OPTIONS: tuple[Option[object], ...] = (RUNNER, TRACER, SANITIZE, CHAOS, STORM_DURATION)


def _switch(value: str, flag: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off", ""):
        return False
    raise OptionError(f"{flag}={value!r} is not valid; use true or false")


# The command line's alone (pytest keeps its own tmp_path folders): a switch, no value.
KEEP_ARTIFACTS: Option[bool] = Option(
    flag="--keep-artifacts",
    ini="afterclose_keep_artifacts",
    parse=_switch,
    about="keep the artifacts (logs, traces) of passing runs too; by default only a failure's "
    "are kept and the rest deleted",
    default=False,
)
