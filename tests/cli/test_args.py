"""harness.cli.args: every command line's errors are one line with the error's exit code; bugs keep tracebacks."""
from __future__ import annotations

import pytest

from harness.cli import main as harness_main
from harness.cli.args import Parser, int_list, run
from harness.errors import HarnessError
from harness.merge import VerifyError


def parser() -> Parser:
    parser = Parser(prog="tool")
    parser.add_argument("--lengths", type=int_list)
    return parser


def fail(error: Exception):
    def body(args):
        raise error

    return body


@pytest.mark.parametrize("argv, body, code, line", [
    (["--lengths", "1,x"], fail(AssertionError()), 2,
     "tool: error: argument --lengths: '1,x' is not a comma-separated list of integers"),
    ([], fail(HarnessError("data.path = 'x' does not exist")), 2, "tool: error: data.path = 'x' does not exist"),
    ([], fail(VerifyError("max |diff| 1 > tolerance 0")), 1, "tool: verification failed: max |diff| 1 > tolerance 0"),
])
def test_bad_input_is_one_line_and_its_exit_code(capsys, argv, body, code, line):
    assert run(parser(), argv, body) == code
    assert capsys.readouterr().err == line + "\n"


def test_a_bug_keeps_its_traceback():
    with pytest.raises(ZeroDivisionError):
        run(parser(), [], fail(ZeroDivisionError()))


def test_python_m_harness_names_its_commands(capsys):
    assert harness_main(["nope"]) == 2
    assert "train,demo,eval_ppl,passkey,convert,plan_memory,prepare_data,backends,generate" in capsys.readouterr().err
