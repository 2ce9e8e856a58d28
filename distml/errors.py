"""The one exception type that reaches a user as a one-line message (exit status 2)."""

from __future__ import annotations

import logging


class DistmlError(ValueError):
    """Bad input or an unusable environment, explained in one line.

    `option` names the command-line option at fault, when there is one, so the CLI can say
    `--k: must be at least 2` rather than a bare message.
    """

    def __init__(self, message: str, option: str | None = None):
        self.option = option
        self.message = message
        super().__init__(f"{option}: {message}" if option else message)


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal (SIGINT, SIGTERM or SIGHUP), as the KeyboardInterrupt a run already handles, with the
    signal's number and, once the run has a folder, the command that finishes it."""

    def __init__(self, signum: int = 2, resume: str | None = None):
        super().__init__(signum)
        self.signum = signum
        self.resume = resume

    @classmethod
    def of(cls, stop: KeyboardInterrupt, resume: str | None, log: logging.Logger) -> Interrupted:
        """What a run raises for `stop` (Ctrl-C, or a stop signal the CLI raised as one), the resume line logged at
        once: `ray job stop` kills in seconds."""
        if resume is not None:
            log.info(f"interrupted: resume with `{resume}`")
        return cls(getattr(stop, "signum", 2), resume)
