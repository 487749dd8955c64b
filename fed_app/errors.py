"""UserError: the one base class of every error a user fixes by changing an input (a run-config value, a
manifest, a data or weights path); its message is one sentence naming the value and the fix. Each module
defines its own subclass (DataError, shared by data.py and partition.py, lives here); `fed_app.cli.exit_on_user_error`
is the one place that catches them. `override_hint` phrases a fix the way the user gives values."""

import os


class UserError(Exception):
    """Bad input, said in one sentence that names the value and the fix."""


class DataError(UserError, RuntimeError):
    """Data that cannot be loaded or split as asked; the message says how to fix it."""


CONFIG_FROM = "FEDIT_CONFIG_FROM"  # how the user gives run-config values: 'make', 'manifest', else --run-config


def override_hint(key: str, value: str) -> str:
    """How to set run-config `key` to `value` (its TOML text), phrased the way the user ran the command: make's
    RUN_CONFIG, a manifest's base (the Makefile and the runner set FEDIT_CONFIG_FROM), or --run-config."""
    via = os.environ.get(CONFIG_FROM, "")
    if via == "make":
        return f"add RUN_CONFIG=\"{key}={value}\" to the make command"
    if via == "manifest":
        return f"set {key}: {value} in the manifest's base"
    return f"pass --run-config \"{key}={value}\""
