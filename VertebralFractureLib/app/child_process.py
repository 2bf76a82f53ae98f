"""Forked child processes that let ``run`` overlap independent work (:class:`ChildProcess`), where forking is safe
(:func:`can_fork`), and the versions of the modules the children imported (for ``result.json``)."""

from __future__ import annotations

from collections import deque
from pathlib import Path

#: modules whose versions ``result.json`` lists
VERSIONED = ("numpy", "SimpleITK", "torch", "monai", "radiomics", "pydicom")
#: ``__version__`` of the modules a :class:`ChildProcess` imported (a module's own version string can differ from
#: its distribution's: pyradiomics says "v3.1.4")
CHILD_VERSIONS: dict[str, str] = {}


def can_fork() -> bool:
    """Whether this process may fork workers that inherit its memory: Linux, not inside 3D Slicer's application (Qt
    and VTK do not survive a fork), not a daemonic process (e.g. a Dask worker; those may not have children), and
    no other Python thread (the child would inherit its locks mid-work) but tqdm's monitor, which the command line's
    progress bar starts: it only sleeps between looks at the bar's refresh rate, and the children draw no progress.
    The children run no torch or OpenMP code."""
    import multiprocessing
    import sys
    import threading

    others = [t for t in threading.enumerate() if t is not threading.current_thread() and t.name != "tqdm_monitor"]
    return (sys.platform.startswith("linux") and "slicer" not in sys.modules
            and not Path(sys.executable).name.lower().startswith("slicer")
            and not multiprocessing.current_process().daemon and not others)


class ChildProcess:
    """A forked child process that runs ``fn(*args, **kwargs)`` at once on what it inherits (nothing large is copied or
    pickled), then the later calls sent by :meth:`call` (their arguments pickled), one after another.

    :meth:`result` returns the next result, in call order, or re-raises the child's exception (only return values,
    exceptions and later calls' arguments are pickled). A child that dies without an answer (killed, crashed) leaves
    its remaining calls to this process. :meth:`close` ends the child (at once if it is still busy: an error or cancel
    in this process).
    """

    def __init__(self, fn, *args, **kwargs) -> None:
        import multiprocessing

        self._calls = deque([(fn, args, kwargs)])
        ctx = multiprocessing.get_context("fork")
        self._conn, child_end = ctx.Pipe()
        self._proc = ctx.Process(target=_child_main, args=(child_end, fn, args, kwargs))
        self._proc.start()
        child_end.close()

    def call(self, fn, *args, **kwargs) -> None:
        """Queue ``fn(*args, **kwargs)`` after the calls before it; :meth:`result` returns its value in turn."""
        self._calls.append((fn, args, kwargs))
        if self._proc is not None:
            try:
                self._conn.send((fn, args, kwargs))
            except OSError:  # the child is gone: the call runs here
                self._end()

    def result(self):
        fn, args, kwargs = self._calls.popleft()
        answer = None
        if self._proc is not None:
            try:
                answer = self._conn.recv()
            except (EOFError, OSError):  # the child died without an answer: this call and the rest run here
                self._end()
        if answer is None:
            return fn(*args, **kwargs)
        ok, value, versions_seen = answer
        CHILD_VERSIONS.update(versions_seen)
        if not ok:
            raise value
        return value

    def close(self) -> None:
        if self._proc is None:
            return
        if not self._calls:
            try:
                self._conn.send(None)  # done: the child returns
            except OSError:
                pass
        self._end()

    def _end(self) -> None:
        if self._calls and self._proc.is_alive():
            self._proc.terminate()
        self._proc.join()
        self._conn.close()
        self._proc = None


def _child_main(conn, fn, args, kwargs) -> None:
    """Body of a :class:`ChildProcess`: answer each call with ``(ok, value or exception, versions)`` until told to stop."""
    import signal
    import sys

    # Ctrl-C reaches the whole process group: the parent cancels and ends its children, which print nothing; the
    # parent's SIGTERM handler is not theirs (terminate() ends them); and a parent killed outright takes them along
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent()

    while True:
        try:
            ok, value = True, fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - the parent re-raises it
            ok, value = False, exc
        seen = {name: str(getattr(sys.modules[name], "__version__", "unknown"))
                for name in VERSIONED if name in sys.modules}
        conn.send((ok, value, seen))
        try:
            message = conn.recv()
        except EOFError:  # the parent is gone
            return
        if message is None:
            return
        fn, args, kwargs = message


def _die_with_parent() -> None:
    """Ask Linux to send this process SIGTERM when its parent dies (prctl PR_SET_PDEATHSIG): a ``run`` killed with
    SIGKILL leaves no child writing into its abandoned temporary folder."""
    import ctypes
    import os
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(1)
