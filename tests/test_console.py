"""Plain-text output when stdout is not a terminal."""

import io
import os
import sys

from centernet_ray.console import PlainTextStream, plain, plain_output_unless_terminal


def test_plain_removes_colours_cursor_moves_and_titles_and_keeps_the_text():
    coloured = "\x1b[36m(RayTrainWorker pid=1)\x1b[0m step 2/2 \x1b[1m\x1b[32mhttp://127.0.0.1:8265\x1b[39m\x1b[22m"
    assert plain(coloured) == "(RayTrainWorker pid=1) step 2/2 http://127.0.0.1:8265"
    assert plain("bar 10%\x1b[A\x1b[A\x1b[2K\x1b]0;title\x07done") == "bar 10%done"


def test_the_stream_writes_plain_text_and_is_not_a_terminal():
    sink = io.StringIO()
    stream = PlainTextStream(sink)
    stream.write("\x1b[33mwarning\x1b[0m\n")
    stream.writelines(["a\x1b[A", "b\n"])
    for update in ("\rsampling 0%", "\rsampling 50%", "\rsampling 100%", "\n"):  # tqdm redraws its line
        stream.write(update)
        stream.flush()
    stream.write("done\r\n")
    assert sink.getvalue() == "warning\nab\nsampling 100%\ndone\n" and not stream.isatty()


def test_output_becomes_plain_only_when_stdout_is_not_a_terminal(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("RAY_COLOR_PREFIX", raising=False)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    assert plain_output_unless_terminal() is False and sys.stdout is terminal

    pipe, errors = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", pipe)
    monkeypatch.setattr(sys, "stderr", errors)
    assert plain_output_unless_terminal() is True
    print("\x1b[36m(pid=1)\x1b[0m hello")
    print("\x1b[31mboom\x1b[0m", file=sys.stderr)
    assert pipe.getvalue() == "(pid=1) hello\n" and errors.getvalue() == "boom\n"
    assert os.environ["RAY_COLOR_PREFIX"] == "0"
    assert plain_output_unless_terminal() is True and sys.stdout._stream is pipe  # not wrapped twice
