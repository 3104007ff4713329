"""Validators for the command-line and ini options; each raises ``pytest.UsageError``."""

from __future__ import annotations

from collections.abc import Callable

import pytest

RUNNER_CHOICES = ("process", "docker")
TRACER_CHOICES = ("auto", "preload", "ebpf", "off")
SANITIZE_CHOICES = ("none", "address", "undefined")
CHAOS_LEVELS = ("off", "on", "low", "medium", "high")


def _choice(option: str, choices: tuple[str, ...]) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in choices:
            raise pytest.UsageError(
                f"{option}={value!r} is not valid; choose one of: {', '.join(choices)}"
            )
        return value

    check.__name__ = option.lstrip("-")
    return check


runner = _choice("--runner", RUNNER_CHOICES)
tracer = _choice("--tracer", TRACER_CHOICES)
sanitize = _choice("--sanitize", SANITIZE_CHOICES)


def target(value: str) -> str:
    if not value.strip():
        raise pytest.UsageError("--target is empty; give a target name or a manifest path")
    return value.strip()


def chaos(value: str) -> str:
    if value in CHAOS_LEVELS or (value.isdigit() and 0 <= int(value) <= 10):
        return value
    raise pytest.UsageError(
        f"--chaos={value!r} is not valid; use off, on, low, medium, high or a level 0-10"
    )


def fault_seed(value: str) -> int:
    try:
        seed = int(value, 0)
    except ValueError:
        raise pytest.UsageError(
            f"--fault-seed={value!r} is not a whole number (the seed a failure report printed)"
        ) from None
    if not 0 <= seed < 2**64:
        raise pytest.UsageError(f"--fault-seed={value!r} must be between 0 and 2**64-1")
    return seed


def kernel(value: str) -> str:
    if not value.strip():
        raise pytest.UsageError("--kernel is empty; give a version such as 6.12, or a path")
    return value.strip()


def kernel_timeout(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 10 <= seconds <= 86_400:
        raise pytest.UsageError(
            f"--kernel-timeout={value!r} is not valid; give seconds between 10 and 86400 "
            "(the time limit of one kernel's whole guest run)"
        )
    return seconds


# (option name, ini name, validator, help)
OPTIONS: tuple[tuple[str, str, Callable[[str], object], str], ...] = (
    (
        "--target",
        "afterclose_target",
        target,
        "target to test: a name (targets/NAME.toml, targets/NAME/target.toml, or built-in) "
        "or a path to a manifest",
    ),
    (
        "--runner",
        "afterclose_runner",
        runner,
        f"where the target runs: {', '.join(RUNNER_CHOICES)} (default: process)",
    ),
    (
        "--tracer",
        "afterclose_tracer",
        tracer,
        f"fd-lifecycle tracer: {', '.join(TRACER_CHOICES)} (default: auto)",
    ),
    (
        "--kernel",
        "afterclose_kernel",
        kernel,
        "run the tests inside qemu guests booted on other Linux kernels: versions (6.1,6.12),"
        " Debian package names, .deb files or kernel image paths, comma-separated",
    ),
    (
        "--kernel-timeout",
        "afterclose_kernel_timeout",
        kernel_timeout,
        "time limit in seconds of one kernel's guest run (default: 600 + 120 per test)",
    ),
    (
        "--chaos",
        "afterclose_chaos",
        chaos,
        "schedule perturbation in the target: off, on, low, medium, high or 0-10 (default: off)",
    ),
    (
        "--fault-seed",
        "afterclose_fault_seed",
        fault_seed,
        "seed of the client-side fault schedule (default: random, printed in the header)",
    ),
    (
        "--sanitize",
        "afterclose_sanitize",
        sanitize,
        f"build [compile] targets with a sanitizer: {', '.join(SANITIZE_CHOICES)}",
    ),
)
