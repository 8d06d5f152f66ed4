"""argparse value types that reject bad values while the command line is parsed (exit code 2,
one line naming the option), before any work starts."""
from __future__ import annotations

import argparse
from typing import Callable

from .format import AqlmScheme


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def scheme_type(text: str) -> AqlmScheme:
    """An argparse type: an AQLM scheme such as ``2x8g8``, within the limits the kernels accept."""
    try:
        return AqlmScheme.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (``prog: error: message``), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")
