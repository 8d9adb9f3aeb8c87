"""The one base class for mistakes a user can fix (a bad config, path, shard, checkpoint or weights file).

The CLI turns a :class:`UserError` into one line on stderr and exit code 2; anything else is our bug and keeps
its traceback. It lives in the bottom layer so that every package can raise it without importing upward.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user gave us is wrong; the message names what and where, in one line."""
