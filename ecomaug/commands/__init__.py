"""Thin click commands: parse, validate, call a library function, print."""

from __future__ import annotations

import math

import click


class FloatRange(click.FloatRange):
    """click's ``FloatRange`` that refuses ``nan`` too (it compares false with every bound, so
    click's own check lets it through); one ``Error:`` line, exit 2, like any bad value."""

    def convert(self, value, param, ctx):  # type: ignore[override]
        number = super().convert(value, param, ctx)
        if isinstance(number, float) and math.isnan(number):
            self.fail(f"{value!r} is not a number in the range {self._describe_range()}.", param, ctx)
        return number
