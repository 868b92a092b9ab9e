"""Small helpers shared by test modules (pytest puts tests/ on sys.path)."""

from __future__ import annotations


def to_argv(flags: dict) -> list[str]:
    """{"max_steps": 4, "force_delta": True, "lora_target_modules": ["to_q"]} -> CLI argv.

    True is a bare switch; None and False are left out; a list becomes several values."""
    argv: list[str] = []
    for name, value in flags.items():
        if value is True:
            argv.append(f"--{name}")
        elif value is not None and value is not False:
            argv += [f"--{name}", *(map(str, value) if isinstance(value, (list, tuple)) else [str(value)])]
    return argv
