"""Container image references, checked the way docker and podman parse them, before any engine is asked.

An engine answers a malformed name with an HTTP 400 ("invalid reference format") deep inside a
build; checking the grammar first turns that into one line naming the value and where it came from.
The grammar is distribution's (github.com/distribution/reference, reference.go), which both engines use:
    reference  := name [ ":" tag ] [ "@" digest ]
    name       := [ domain "/" ] path-component [ "/" path-component ]*
    path-component := [a-z0-9]+ ( ( "." | "_" | "__" | "-"+ ) [a-z0-9]+ )*
An image ID (`sha256:<64 hex>`) names an image too: gpuwheel builds FROM the base image's ID.
"""

from __future__ import annotations

import re

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN = (
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
)
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_REFERENCE = re.compile(rf"(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*(?::{_TAG})?(?:@{_DIGEST})?")
_IMAGE_ID = re.compile(r"sha256:[0-9a-f]{64}")


def image_reference_problem(value: str) -> str | None:
    """Why `value` cannot name an image (None: it can), in words a user can act on."""
    if not value.strip():
        return "it is empty"
    if _IMAGE_ID.fullmatch(value) or _REFERENCE.fullmatch(value):
        return None
    if value != value.strip():
        return "it has leading or trailing spaces"
    if _REFERENCE.fullmatch(value.lower()):
        return "repository names are lowercase"
    return (
        "it is not NAME[:TAG][@DIGEST] (NAME: lowercase letters and digits, separated by . _ - or /, "
        "after an optional registry host)"
    )
