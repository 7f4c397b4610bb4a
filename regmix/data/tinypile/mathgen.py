"""tinypile's math domain: generated arithmetic and algebra problems with worked answers."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction

MATH_SEED = 20240607
MATH_DOCUMENTS = 3000  # ~5 MB, enough for the full cap; tiny builds take a subset


# --------------------------------------------------------------------------------------------
# Synthetic mathematics (DeepMind-Mathematics-like question/answer pairs)
# --------------------------------------------------------------------------------------------

def poly_str(coeffs: list[int], var: str = "x") -> str:
    """Format coefficients (highest degree first) as a Python-evaluable polynomial."""
    terms = []
    for power, coef in zip(range(len(coeffs) - 1, -1, -1), coeffs, strict=True):
        if coef == 0:
            continue
        mag = abs(coef)
        body = "" if mag == 1 and power else str(mag)
        if power:
            body += ("*" if body else "") + var + (f"**{power}" if power > 1 else "")
        terms.append(("-" if coef < 0 else "+", body))
    if not terms:
        return "0"
    text = ("-" if terms[0][0] == "-" else "") + terms[0][1]
    return text + "".join(f" {sign} {body}" for sign, body in terms[1:])


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


def _nonzero(rng: random.Random, lo: int, hi: int) -> int:
    return rng.choice([v for v in range(lo, hi + 1) if v])


def _var(rng: random.Random) -> str:
    return rng.choice("abcdfghjklmnpqrstuvwxyz")


def _q_add_sub(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(-1000, 1000), rng.randint(-1000, 1000)
    op = rng.choice("+-")
    return f"What is {a} {op} {b}?", str(a + b if op == "+" else a - b)


def _q_mul_div(rng: random.Random) -> tuple[str, str]:
    b, q = _nonzero(rng, -40, 40), rng.randint(-300, 300)
    if rng.random() < 0.5:
        return f"Calculate {q}*{b}.", str(q * b)
    return f"Divide {q * b} by {b}.", str(q)


def _expression(rng: random.Random, depth: int) -> tuple[str, int]:
    if depth == 0 or rng.random() < 0.3:
        value = rng.randint(-20, 20)
        return (f"({value})" if value < 0 else str(value)), value
    (left, lv), (right, rv) = _expression(rng, depth - 1), _expression(rng, depth - 1)
    op = rng.choice("+-*")
    value = lv + rv if op == "+" else lv - rv if op == "-" else lv * rv
    return f"({left} {op} {right})", value


def _q_expression(rng: random.Random) -> tuple[str, str]:
    text, value = _expression(rng, 3)
    return f"Evaluate {text}.", str(value)


def _q_linear(rng: random.Random) -> tuple[str, str]:
    v, x, a, b = _var(rng), rng.randint(-20, 20), _nonzero(rng, -12, 12), rng.randint(-50, 50)
    return f"Solve {poly_str([a, b], v)} = {a * x + b} for {v}.", str(x)


def _q_system(rng: random.Random) -> tuple[str, str]:
    while True:
        a1, b1, a2, b2 = (_nonzero(rng, -9, 9) for _ in range(4))
        if a1 * b2 - a2 * b1:
            break
    x, y = rng.randint(-15, 15), rng.randint(-15, 15)
    v, w = rng.sample("abcdfghjkmnpqrstuvwxyz", 2)
    eq1 = f"{poly_str([a1, 0], v)} + {poly_str([b1, 0], w)} = {a1 * x + b1 * y}"
    eq2 = f"{poly_str([a2, 0], v)} + {poly_str([b2, 0], w)} = {a2 * x + b2 * y}"
    return f"Solve {eq1}, {eq2} for {v}.".replace("+ -", "- "), str(x)


def _q_poly_eval(rng: random.Random) -> tuple[str, str]:
    coeffs = [_nonzero(rng, -9, 9)] + [rng.randint(-9, 9) for _ in range(rng.randint(1, 3))]
    v, x = _var(rng), rng.randint(-6, 6)
    value = sum(c * x ** p for p, c in enumerate(reversed(coeffs)))
    return f"Let f({v}) = {poly_str(coeffs, v)}. What is f({x})?", str(value)


def _q_gcd_lcm(rng: random.Random) -> tuple[str, str]:
    g = rng.randint(2, 40)
    a, b = g * rng.randint(1, 60), g * rng.randint(1, 60)
    if rng.random() < 0.5:
        return f"What is the greatest common divisor of {a} and {b}?", str(math.gcd(a, b))
    a, b = rng.randint(2, 300), rng.randint(2, 300)
    return f"What is the lowest common multiple of {a} and {b}?", str(math.lcm(a, b))


def _q_remainder(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(100, 99999), rng.randint(2, 99)
    return f"What is the remainder when {a} is divided by {b}?", str(a % b)


def _q_prime(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(2, 20000)
    if rng.random() < 0.5:
        while not _is_prime(n):
            n += 1
    return f"Is {n} a prime number?", str(_is_prime(n))


def _q_derivative(rng: random.Random) -> tuple[str, str]:
    coeffs = [_nonzero(rng, -12, 12)] + [rng.randint(-12, 12) for _ in range(rng.randint(1, 4))]
    v, degree = _var(rng), len(coeffs) - 1
    derivative = [c * (degree - i) for i, c in enumerate(coeffs[:-1])]
    return f"Differentiate {poly_str(coeffs, v)} with respect to {v}.", poly_str(derivative, v)


def _q_expand(rng: random.Random) -> tuple[str, str]:
    a, b, c, d = _nonzero(rng, -7, 7), _nonzero(rng, -9, 9), _nonzero(rng, -7, 7), \
        _nonzero(rng, -9, 9)
    v = _var(rng)
    product = [a * c, a * d + b * c, b * d]
    return f"Expand ({poly_str([a, b], v)})*({poly_str([c, d], v)}).", poly_str(product, v)


def _q_fraction(rng: random.Random) -> tuple[str, str]:
    p = Fraction(rng.randint(-20, 20), rng.randint(2, 15))
    q = Fraction(rng.randint(1, 20), rng.randint(2, 15))
    op = rng.choice("+-*")
    value = p + q if op == "+" else p - q if op == "-" else p * q
    return (f"What is {p.numerator}/{p.denominator} {op} {q.numerator}/{q.denominator}? "
            "Give the answer in lowest terms."), str(value)


def _q_round(rng: random.Random) -> tuple[str, str]:
    x = Decimal(rng.randint(-999999, 999999)) / Decimal(10 ** rng.randint(3, 5))
    places = rng.randint(0, 2)
    answer = x.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)
    return f"Round {x} to {places} decimal places.", str(answer)


def _q_base(rng: random.Random) -> tuple[str, str]:
    n, base = rng.randint(2, 100000), rng.choice([2, 3, 5, 7, 8, 12, 16])
    digits = ""
    m = n
    while m:
        digits = "0123456789abcdef"[m % base] + digits
        m //= base
    return f"Convert {n} (base 10) to base {base}.", digits


def _q_sort(rng: random.Random) -> tuple[str, str]:
    values = rng.sample(range(-500, 500), rng.randint(3, 7))
    order = rng.choice(["increasing", "decreasing"])
    answer = sorted(values, reverse=order == "decreasing")
    return (f"Sort {', '.join(map(str, values))} in {order} order.",
            ", ".join(map(str, answer)))


MATH_PROBLEMS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "arithmetic__add_sub": _q_add_sub, "arithmetic__mul_div": _q_mul_div,
    "arithmetic__mixed": _q_expression, "algebra__linear_1d": _q_linear,
    "algebra__linear_2d": _q_system, "polynomials__evaluate": _q_poly_eval,
    "numbers__gcd_lcm": _q_gcd_lcm, "numbers__remainder": _q_remainder,
    "numbers__is_prime": _q_prime, "calculus__differentiate": _q_derivative,
    "polynomials__expand": _q_expand, "arithmetic__fractions": _q_fraction,
    "arithmetic__round": _q_round, "numbers__base_conversion": _q_base,
    "comparison__sort": _q_sort,
}


def math_documents(count: int = MATH_DOCUMENTS, seed: int = MATH_SEED) -> list[str]:
    """Documents of 10-30 question/answer pairs; deterministic for a given seed."""
    docs = []
    kinds = sorted(MATH_PROBLEMS)
    for i in range(count):
        rng = random.Random(seed * 1_000_003 + i)
        pairs = [MATH_PROBLEMS[rng.choice(kinds)](rng) for _ in range(rng.randint(10, 30))]
        docs.append("\n\n".join(f"Question: {q}\nAnswer: {a}" for q, a in pairs))
    return docs
