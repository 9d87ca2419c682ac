"""What every command-line entry point shares: one-line errors, Ctrl-C/SIGTERM handling."""
from __future__ import annotations

import signal
import sys

from .distributed import cleanup
from .registry import AddpError


def _raise_interrupt(*_):
    raise KeyboardInterrupt


def run(main, args, output_dir: str | None = None, errors: tuple = (AddpError,)) -> int:
    """Call `main(args)`: an exception of `errors` is printed as one `error:` line (exit 2);
    Ctrl-C or SIGTERM says the last complete checkpoint is intact (exit 130)."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        main(args)
    except errors as e:
        text = str(e).strip().splitlines()
        print(f"error: {text[0] if text else type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = f" in {output_dir}" if output_dir else ""
        print(f"\ninterrupted: the last complete checkpoint{where} is intact; "
              "run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        cleanup()
    return 0
