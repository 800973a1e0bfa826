"""The commands' console logging: INFO lines on stdout, warnings on stderr, one line per record."""

from __future__ import annotations

import logging

from mfnet_runtime.console import configure_logging


def test_info_goes_to_stdout_and_warnings_to_stderr_once(capsys):
    configure_logging()
    configure_logging()  # a second call replaces the handlers instead of doubling every line
    logging.getLogger("mfnet.training.loop").info("epoch 1: loss 0.5")
    logging.getLogger("mfnet_runtime.video").warning("frame count differs")
    logging.getLogger("mfnet.export").debug("not shown without verbose")
    captured = capsys.readouterr()
    assert captured.out == "epoch 1: loss 0.5\n"
    assert captured.err == "warning: frame count differs\n"


def test_verbose_shows_debug(capsys):
    configure_logging(verbose=True)
    try:
        logging.getLogger("mfnet.export").debug("graph details")
        assert capsys.readouterr().out == "graph details\n"
    finally:
        configure_logging()
