"""Bearer-token authentication of gateway requests against a tokens file."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from clinfer.errors import ConfigurationError

logger = logging.getLogger(__name__)

QUERY_SCOPE = "query"


@dataclass(frozen=True)
class TokenEntry:
    """The user and scopes that one token grants."""

    user: str
    scopes: frozenset[str]


def hash_token(token: str) -> str:
    """Return the hex SHA-256 of ``token``, the key of the tokens file."""
    return hashlib.sha256(token.encode()).hexdigest()


def load_tokens(path: str | Path) -> dict[str, TokenEntry]:
    """Load a tokens file: a JSON object mapping token SHA-256 to user and scopes.

    The file looks like ``{"<sha256 hex>": {"user": "alice", "scopes": ["query"]}}``
    so that it never contains a token itself.

    Parameters
    ----------
    path : str or Path
        The tokens file.

    Returns
    -------
    dict
        Token SHA-256 (lower-case hex) to its entry.

    Raises
    ------
    ConfigurationError
        If the file cannot be read, is not valid JSON or an entry is malformed.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigurationError(f"cannot read the tokens file {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigurationError(
            f"tokens file {path} is not valid JSON: {exc}"
        ) from exc
    if not isinstance(data, dict):
        raise ConfigurationError(
            f"tokens file {path} must contain one JSON object mapping token SHA-256 "
            'to {"user": ..., "scopes": [...]}.'
        )
    tokens: dict[str, TokenEntry] = {}
    for digest, entry in data.items():
        valid = (
            isinstance(entry, dict)
            and isinstance(entry.get("user"), str)
            and isinstance(entry.get("scopes"), list)
            and len(digest) == 64
        )
        if not valid:
            raise ConfigurationError(
                f"tokens file {path} has an invalid entry for key {digest[:12]}...; "
                "each key is a 64-digit SHA-256 hex and each value "
                '{"user": str, "scopes": [str, ...]}.'
            )
        tokens[digest.lower()] = TokenEntry(
            user=entry["user"], scopes=frozenset(map(str, entry["scopes"]))
        )
    logger.info("loaded %d gateway tokens", len(tokens))
    return tokens
