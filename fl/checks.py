"""The one config validator and the one seed derivation every layer uses.

`require` raises the project's error for a bad value: it names the key, the value it got and the fix, so a typo or
an impossible setting fails before work starts with one line a user can act on. `derive_seed` gives every seeded
stream (a client's round, a method's shared draw, a sketch's test matrix, the server's DP noise) its own seed from
the run's one `seed`, so no two streams share a generator state and a resumed run draws what the uninterrupted one
would.
"""

from __future__ import annotations

SEED_MODULUS = 2**31 - 1
"""The default modulus: a seed every generator (torch, numpy, Python's random) accepts."""


def require(ok: bool, key: str, value: object, fix: str, *, must: str | None = None) -> None:
    """Raise ValueError naming `key`, its `value` and the `fix`, unless `ok`.

    Parameters
    ----------
    ok : bool
        The check; nothing happens when it holds.
    key : str
        The config key as a user writes it (``privacy.delta``, ``server_opt.lr``).
    value : object
        The value that failed.
    fix : str
        What to do instead (a valid value, the key to change).
    must : str, optional
        The condition in words (``"> 0"``, ``"in (0, 1)"``); the message then reads
        ``"<key> must be <must>, got <value>. <fix>"`` instead of ``"<key>=<value> is invalid: <fix>"``.
    """
    if ok:
        return
    if must is not None:
        raise ValueError(f"{key} must be {must}, got {value!r}. {fix}".rstrip())
    raise ValueError(f"{key}={value!r} is invalid: {fix}")


def derive_seed(
    seed: int, *, stream: int = 0, server_round: int = 0, index: int = 0, modulus: int = SEED_MODULUS
) -> int:
    """The seed of one stream: ``(seed · 1,000,003 + stream + server_round · 10,007 + index) mod modulus``.

    Parameters
    ----------
    seed : int
        The run's seed.
    stream : int
        A constant naming the stream (a salt, a CRC of a module name), so two streams of one round differ.
    server_round : int
        The round the draw belongs to.
    index : int
        The party or part within the round (a partition id, a rank · 101).
    modulus : int
        The range of the result (2^31 − 1 by default; 2^63 where a 64-bit generator seed is wanted).
    """
    return (int(seed) * 1_000_003 + stream + server_round * 10_007 + index) % modulus
