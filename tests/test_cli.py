"""The CLI called in-process as main([...])."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from clinfuse.cli import build_parser, main


def test_help_lists_every_command_with_one_line(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # an ordinary terminal
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for cmd in build_parser()._subparsers._group_actions[0].choices:
        i = next(i for i, line in enumerate(lines) if line.strip().startswith(cmd + " "))
        assert len(lines[i].split(None, 1)[1]) > 10
        assert not lines[i + 1].startswith(" " * 14), f"the help of '{cmd}' wraps to a second line"
    for group, subs in ((["cohort"], ("build", "inspect")), (["pacs"], ("pull", "run", "listen"))):
        with pytest.raises(SystemExit):
            main([*group, "--help"])
        lines = capsys.readouterr().out.splitlines()
        for sub in subs:
            i = next(i for i, line in enumerate(lines) if line.strip().startswith(sub + " "))
            assert not lines[i + 1].startswith(" " * 14), f"the help of '{' '.join(group)} {sub}' wraps"


@pytest.mark.parametrize("argv", [["synth", "--help"], ["cohort", "build", "--help"], ["cohort", "inspect", "--help"],
                                  ["pacs", "pull", "--help"], ["pacs", "run", "--help"], ["pacs", "listen", "--help"]])
def test_subcommand_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0 and "usage: clinfuse" in capsys.readouterr().out


def test_synth_then_build_then_inspect(tmp_path, capsys):
    exp, coh = tmp_path / "export", tmp_path / "cohort"
    assert main(["synth", "--out", str(exp), "--studies", "40", "--size", "40", "--corrupt", "2", "--no-progress"]) == 0
    assert "next: clinfuse cohort build" in capsys.readouterr().out
    rc = main(["cohort", "build", "--dicom", str(exp / "dicom"), "--reports", str(exp / "reports.csv"),
               "--labels", str(exp / "labels.csv"), "--out", str(coh), "--no-progress",
               "--set", "cohort.split.seed=4"])
    out = capsys.readouterr().out
    assert rc == 0 and "studies 40" in out and "set aside" in out and "empty file" in out
    assert "seed: 4" in (coh / "config.yaml").read_text()
    with open(coh / "cohort.csv") as f:
        assert len(list(csv.DictReader(f))) == 40
    assert main(["cohort", "inspect", str(coh)]) == 0
    table = capsys.readouterr().out
    assert "train" in table and "test" in table and "img only" in table


def test_multiclass_next_command_runs(tmp_path, capsys):
    exp = tmp_path / "e"
    main(["synth", "--out", str(exp), "--studies", "30", "--size", "32", "--task", "multiclass", "--no-progress"])
    nxt = capsys.readouterr().out.split("next: clinfuse ")[1].strip().replace("COHORT_DIR", str(tmp_path / "c"))
    import shlex

    assert main(shlex.split(nxt) + ["--no-progress"]) == 0
    assert "classes=normal, pneumonia, effusion, nodule" in capsys.readouterr().out
    assert "--classes normal,pneumonia,effusion,nodule" in nxt


def test_errors_are_one_line_with_status_2(tmp_path, capsys):
    (tmp_path / "labels.csv").write_text("id,label\n1,1\n")
    rc = main(["cohort", "build", "--dicom", str(tmp_path), "--labels", str(tmp_path / "labels.csv"),
               "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "key column 'StudyInstanceUID' not found" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("cohort:\n  colour: red\n")
    rc = main(["cohort", "build", "--labels", str(tmp_path / "labels.csv"), "--out", str(tmp_path / "c"),
               "--config", str(bad)])
    assert rc == 2 and "unknown key 'cohort.colour'" in capsys.readouterr().err


def test_console_script_entry_point():
    r = subprocess.run([sys.executable, "-m", "clinfuse.cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("clinfuse ")


def test_train_command_and_resume_flag(tmp_path, capsys):
    from pathlib import Path

    exp, coh, run = tmp_path / "e", tmp_path / "c", tmp_path / "run"
    main(["synth", "--out", str(exp), "--studies", "40", "--size", "32", "--no-progress"])
    main(["cohort", "build", "--dicom", str(exp / "dicom"), "--reports", str(exp / "reports.csv"),
          "--labels", str(exp / "labels.csv"), "--out", str(coh), "--no-progress"])
    capsys.readouterr()
    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    common = ["train", "--cohort", str(coh), "--config", tiny, "--out", str(run), "--no-progress",
              "--set", "data.image_size=[32, 32]", "--set", "train.epochs=2", "--set", "train.batch_size=8"]
    assert main(common + ["--max-steps", "3"]) == 0
    assert "interrupted (resume with --resume)" in capsys.readouterr().out
    assert main(common + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert "epoch   2" in out and "finished" in out and "val_auroc" in out
    rc = main(["train", "--cohort", str(tmp_path / "nope"), "--out", str(run), "--no-progress"])
    assert rc == 2 and "not a cohort folder" in capsys.readouterr().err


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, tmp_path, capsys):
    from clinfuse import cli

    assert main(["evaluate", "--model", str(tmp_path / "none"), "--cohort", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and "Traceback" not in err

    def bug(args):
        raise ValueError("an internal bug, not the user's input")

    monkeypatch.setattr(cli, "_cohort_inspect", bug)
    with pytest.raises(ValueError, match="internal bug"):
        main(["cohort", "inspect", str(tmp_path)])
