"""What gpuwheel shows and records of a secret: never the secret.

Recipes may carry tokens in `[package.env]` and credentials in index or git URLs. The real values
reach only the build's environment and the network requests; plans (text and JSON), messages and
the provenance inside wheels get these masked forms. The plan hash still covers the real values.
"""

from __future__ import annotations

import re

MASK = "****"
# Variable names that hold a secret by convention (GITHUB_TOKEN, AWS_SECRET_ACCESS_KEY, HF_TOKEN…).
_SECRET_NAME = re.compile(
    r"TOKEN|SECRET|PASSWORD|PASSWD|PASSPHRASE|CREDENTIAL|API_?KEY|PRIVATE_?KEY|ACCESS_?KEY|"
    r"AUTH|(^|_)KEY($|_)|(^|_)PAT($|_)",
    re.IGNORECASE,
)
# scheme://user:password@ anywhere in a text; and http(s)://token@ (a token as the user name).
_USER_PASSWORD = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@\s:]*):(?P<password>[^/@\s]*)@")
_TOKEN_USER = re.compile(r"(?P<scheme>https?://)(?P<user>[^/@\s:]+)@")


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def safe_text(text: str) -> str:
    """text with the credentials of every URL in it masked (user names of other schemes kept)."""
    text = _USER_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    return _TOKEN_USER.sub(lambda m: f"{m['scheme']}{MASK}@", text)


def has_password(url: str) -> bool:
    return bool(_USER_PASSWORD.search(url) or _TOKEN_USER.search(url))


def safe_value(name: str, value: str) -> str:
    """An environment value as shown: masked whole when its name says secret, else its URLs masked."""
    return MASK if value and is_secret_name(name) else safe_text(value)


def safe_env(env) -> dict[str, str]:
    """A mapping or (name, value) pairs, as shown and recorded."""
    pairs = env.items() if hasattr(env, "items") else env
    return {name: safe_value(name, value) for name, value in pairs}


def safe_tree(value):
    """A JSON-like value (dicts, lists, strings) with every string's URL credentials masked, and
    the values of secret-named keys masked whole."""
    if isinstance(value, dict):
        return {
            k: (MASK if isinstance(v, str) and v and is_secret_name(str(k)) else safe_tree(v)) for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [safe_tree(v) for v in value]
    return safe_text(value) if isinstance(value, str) else value
