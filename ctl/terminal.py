"""Text from data (product ids, categories, metadata, paths, a server's error details) made safe to print.

A catalog or a ranker reply is not trusted to be printable: an id holding ESC [ 31 m recolours the
terminal, other escape sequences can set its title, move the cursor or hide what follows, and bidi
controls reorder a line. Everything `ctl` prints that comes from data goes through `printable`.
"""

from __future__ import annotations


def printable(text: object) -> str:
    """`text` with every character a terminal could act on written as a Python escape (`\\x1b`, `\\n`,
    `\\x9b`, `\\u202e`): C0 and C1 controls, DEL, bidi and other format characters, separators other than
    the space. A backslash is doubled, so that an escape shown is never mistaken for the text itself."""
    text = str(text)
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(c if c.isprintable() and c != "\\" else repr(c)[1:-1] for c in text)
