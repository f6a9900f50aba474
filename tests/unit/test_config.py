"""The config dialects: INI and TOML, placeholders, inherit, and every error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bedrock import options
from bedrock.config import ConfigError, load


def write(path: Path, text: str, mode: str = "w") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def problems(exc: ConfigError) -> list[str]:
    return [str(p) for p in exc.problems]


def test_ini_repeated_keys_and_comments(tmp_path):
    f = write(tmp_path / "app.ini", "; comment\n# another\n[uwsgi]\nenv = A=1\nenv = B=2\nprocesses = 3\nlazy-apps\n[other]\nwhatever = 1\n")
    cfg = load(str(f))
    assert cfg.getlist("env") == [("A", "1"), ("B", "2")]
    assert cfg.get("processes") == 3
    assert cfg.get("lazy-apps") is True


def test_vassal_section_and_defaults(tmp_path):
    cfg = load(str(write(tmp_path / "v.ini", "[vassal]\nhttp-socket = 127.0.0.1:9000\n")))
    assert cfg.get("processes") == 1
    assert cfg.get("callable") == "application"
    assert cfg.getlist("http-socket") == ["127.0.0.1:9000"]


def test_every_placeholder(tmp_path, monkeypatch):
    monkeypatch.setenv("PE_TEST_VAR", "from-env")
    monkeypatch.delenv("PE_UNDEFINED", raising=False)
    f = write(tmp_path / "site" / "myapp.ini", "\n".join([
        "[uwsgi]",
        "base = /srv/%n",
        "env = N=%n",
        "env = S=%s",
        "env = P=%p",
        "env = D=%d",
        "env = E=%e",
        "env = C=%c",
        "env = K=%(base)/x",
        "env = V=$(PE_TEST_VAR)",
        "env = U=$(PE_UNDEFINED)",
        "env = PCT=100%%",
        "env = KEEP=%z",
        "",
    ]))
    env = dict(load(str(f)).getlist("env"))
    assert env == {
        "N": "myapp",
        "S": "myapp.ini",
        "P": str(f),
        "D": str(f.parent) + "/",
        "E": "ini",
        "C": "site",
        "K": "/srv/myapp/x",
        "V": "from-env",
        "U": "$(PE_UNDEFINED)",
        "PCT": "100%",
        "KEEP": "%z",
    }


def test_set_placeholder_and_chain(tmp_path):
    f = write(tmp_path / "a.ini", "[uwsgi]\nset-placeholder = root=/srv\napp = %(root)/%n\nchdir = %(app)\n")
    assert load(str(f)).get("chdir") == "/srv/a"


def test_inherit_placeholders_expand_for_the_vassal(tmp_path):
    template = write(tmp_path / "tpl" / "base.ini", "[uwsgi]\nchdir = /srv/%n\nprocesses = 4\nenv = FROM=template\nenv = DIR=%d\n")
    f = write(tmp_path / "vassals" / "shop.ini", "[uwsgi]\nprocesses = 2\nenv = FROM=vassal\n")
    cfg = load(str(f), inherit=[str(template)])
    assert cfg.get("chdir") == "/srv/shop"  # %n of the vassal, not "base"
    assert cfg.get("processes") == 2  # the vassal's own single value wins
    assert cfg.getlist("env") == [("FROM", "template"), ("DIR", str(f.parent) + "/"), ("FROM", "vassal")]


def test_vassals_inherit_key_relative_to_vassal(tmp_path):
    write(tmp_path / "templates" / "t.ini", "[uwsgi]\nprocesses = 5\n")
    f = write(tmp_path / "vassals" / "x.ini", "[uwsgi]\nvassals-inherit = %d../templates/t.ini\n")
    assert load(str(f)).get("processes") == 5


def test_overrides_win(tmp_path):
    f = write(tmp_path / "o.ini", "[uwsgi]\nprocesses = 2\n")
    cfg = load(str(f), overrides=[("processes", "7"), ("env", "X=1")])
    assert cfg.get("processes") == 7
    assert cfg.getlist("env") == [("X", "1")]


def test_toml(tmp_path):
    f = write(tmp_path / "t.toml", '[vassal]\nprocesses = 3\nlazy-apps = true\nenv = ["A=1", "B=%n"]\nhttp-socket = "127.0.0.1:1"\n')
    cfg = load(str(f))
    assert cfg.get("processes") == 3 and cfg.get("lazy-apps") is True
    assert cfg.getlist("env") == [("A", "1"), ("B", "t")]


@pytest.mark.parametrize("text", ["true", "1", "yes", "on"])
def test_bool_values(tmp_path, text):
    assert load(str(write(tmp_path / "b.ini", f"[uwsgi]\nlazy-apps = {text}\n"))).get("lazy-apps") is True


# --- errors: each names file, line and key ---------------------------------------


def test_unknown_key(tmp_path):
    f = write(tmp_path / "u.ini", "[uwsgi]\nprocesses = 2\nprocesess = 3\n")
    with pytest.raises(ConfigError) as exc:
        load(str(f))
    assert problems(exc.value) == [f"{f}:3: key 'procesess': unknown option"]


def test_emperor_key_in_vassal_is_named(tmp_path):
    f = write(tmp_path / "u.ini", "[uwsgi]\nemperor-tyrant = true\n")
    with pytest.raises(ConfigError, match="it is an emperor option"):
        load(str(f))


def test_bad_values_all_reported(tmp_path):
    f = write(tmp_path / "b.ini", "[uwsgi]\nprocesses = lots\nlazy-apps = maybe\nhttp-socket = nowhere\nmemory-limit = 12X\nunshare = ipc,warp\n")
    with pytest.raises(ConfigError) as exc:
        load(str(f))
    found = problems(exc.value)
    assert len(found) == 5
    assert found[0].startswith(f"{f}:2: key 'processes'") and "integer" in found[0]
    assert "key 'lazy-apps'" in found[1] and ":3:" in found[1]
    assert "key 'http-socket'" in found[2]
    assert "key 'memory-limit'" in found[3]
    assert "unknown namespace 'warp'" in found[4]


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load(str(tmp_path / "none.ini"))


def test_directory_instead_of_file(tmp_path):
    (tmp_path / "d.ini").mkdir()
    with pytest.raises(ConfigError, match="is a directory"):
        load(str(tmp_path / "d.ini"))


def test_unreadable_file(tmp_path):
    f = write(tmp_path / "secret.ini", "[uwsgi]\nprocesses = 1\n")
    f.chmod(0o000)
    read_r, read_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # as nobody, root would read anything
        os.close(read_r)
        try:
            os.setgid(65534)
            os.setuid(65534)
            load(str(f))
            os.write(read_w, b"no error")
        except ConfigError as exc:
            os.write(read_w, str(exc).encode())
        finally:
            os._exit(0)
    os.close(read_w)
    os.waitpid(pid, 0)
    message = os.read(read_r, 4096).decode()
    os.close(read_r)
    assert message == f"{f}: permission denied"


def test_bad_encoding(tmp_path):
    f = write(tmp_path / "enc.ini", b"[uwsgi]\nenv = A=caf\xe9\n")
    with pytest.raises(ConfigError) as exc:
        load(str(f))
    assert problems(exc.value) == [f"{f}:2: not valid UTF-8 (byte 0xe9 at offset 19)"]


def test_placeholder_loop(tmp_path):
    f = write(tmp_path / "loop.ini", "[uwsgi]\na = %(b)\nb = %(a)\nchdir = %(a)\n")
    with pytest.raises(ConfigError) as exc:
        load(str(f))
    assert any("placeholder loop" in p and "key 'chdir'" in p and ":4:" in p for p in problems(exc.value))


def test_undefined_placeholder(tmp_path):
    f = write(tmp_path / "undef.ini", "[uwsgi]\nchdir = %(nothing)\n")
    with pytest.raises(ConfigError, match=r"undef.ini:2: key 'chdir': undefined placeholder %\(nothing\)"):
        load(str(f))


def test_missing_section(tmp_path):
    with pytest.raises(ConfigError, match=r"no \[uwsgi\] or \[vassal\] section"):
        load(str(write(tmp_path / "s.ini", "[app]\nprocesses = 1\n")))


def test_option_before_section(tmp_path):
    with pytest.raises(ConfigError, match=r"s.ini:1: option outside of any section"):
        load(str(write(tmp_path / "s.ini", "processes = 1\n[uwsgi]\n")))


def test_toml_syntax_error_has_line(tmp_path):
    f = write(tmp_path / "bad.toml", '[vassal]\nprocesses = 1\nenv = "unterminated\n')
    with pytest.raises(ConfigError, match=r"bad.toml:3: TOML syntax error"):
        load(str(f))


def test_toml_bad_type_has_line_and_key(tmp_path):
    f = write(tmp_path / "t.toml", '[vassal]\nprocesses = 1\nenv = {a = 1}\n')
    with pytest.raises(ConfigError, match=r"t.toml:3: key 'env': expected a string"):
        load(str(f))


def test_toml_bad_value_line(tmp_path):
    f = write(tmp_path / "t.toml", '[vassal]\n\nprocesses = "x"\n')
    with pytest.raises(ConfigError, match=r"t.toml:3: key 'processes'"):
        load(str(f))


def test_unknown_extension(tmp_path):
    with pytest.raises(ConfigError, match="unknown config type"):
        load(str(write(tmp_path / "x.yaml", "a: 1")))


def test_check_command_lists_every_error(tmp_path):
    f = write(tmp_path / "c.ini", "[uwsgi]\nprocesses = x\nbogus = 1\n")
    result = subprocess.run([sys.executable, "-m", "vassal", "--check", str(f)], capture_output=True, text=True)
    assert result.returncode == 1
    assert f"{f}:2: key 'processes'" in result.stderr
    assert f"{f}:3: key 'bogus': unknown option" in result.stderr
    ok = write(tmp_path / "ok.ini", "[uwsgi]\nprocesses = 2\n")
    result = subprocess.run([sys.executable, "-m", "vassal", "--check", str(ok)], capture_output=True, text=True)
    assert result.returncode == 0


def test_cli_flags_mirror_keys(tmp_path):
    from bedrock.cliopts import preprocess_argv
    from vassal.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(preprocess_argv(["--processes", "4", "--lazy-apps", "--env", "A=1", "--env", "B=2", "--master=false", "f.ini"], options.VASSAL))
    assert args.settings == [("processes", "4"), ("lazy-apps", "true"), ("env", "A=1"), ("env", "B=2"), ("master", "false")]
    assert args.file == "f.ini"
    help_text = parser.format_help()
    for opt in options.all_options():
        if options.VASSAL in opt.scope:
            assert f"--{opt.name}" in help_text


def test_emperor_bool_flag_does_not_eat_dir():
    from bedrock.cliopts import preprocess_argv
    from emperor.cli import build_parser

    args = build_parser().parse_args(preprocess_argv(["--emperor-tyrant", "/etc/vassals", "--emperor-tyrant=false"], options.EMPEROR))
    assert args.dirs == ["/etc/vassals"]
    assert args.settings == [("emperor-tyrant", "true"), ("emperor-tyrant", "false")]


def test_examples_validate():
    root = Path(__file__).resolve().parents[2] / "examples" / "vassals"
    files = sorted(p for p in root.iterdir() if p.suffix in (".ini", ".toml"))
    assert len(files) >= 3
    for f in files:
        load(str(f))


# --- files that are not small regular configs, and the handed-over config ------------------


@pytest.mark.parametrize("kind", ["fifo", "device", "huge", "entries"])
def test_only_small_regular_files_are_read(tmp_path, kind):
    """A FIFO would block the reader forever and /dev/zero read until
    MemoryError; a huge file froze the emperor's loop (issue 10, items 9, 19)."""
    target = tmp_path / "t.ini"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "device":
        os.symlink("/dev/zero", target)
    elif kind == "huge":
        write(target, "[uwsgi]\n" + "#" * (1 << 20))
    else:
        write(target, "[uwsgi]\n" + "env = A=B\n" * 5001)
    f = write(tmp_path / "v.ini", f"[uwsgi]\nvassals-inherit = {target}\n")
    with pytest.raises(ConfigError) as err:
        load(str(f))
    words = {"fifo": "is a FIFO", "device": "is a character device", "huge": "too large", "entries": "too many entries"}[kind]
    assert words in str(err.value) and str(target) in str(err.value)


def test_handed_config_is_what_was_validated(tmp_path, monkeypatch):
    """The vassal rebuilds the emperor's expanded entries without expanding
    them again: %% stays one percent sign, $(VAR) is the emperor's value."""
    from bedrock.config import from_json

    monkeypatch.setenv("PE_HANDED", "from-the-emperor")
    f = write(tmp_path / "h.ini", "[uwsgi]\nmy = %%(my)\nenv = A=100%%\nenv = B=$(PE_HANDED)\nenv = C=%(my) %n\nprocesses = 2\n")
    cfg = load(str(f))
    monkeypatch.setenv("PE_HANDED", "changed")
    again = from_json(cfg.to_json())
    assert again.getlist("env") == cfg.getlist("env") == [("A", "100%"), ("B", "from-the-emperor"), ("C", "%(my) h")]
    assert again.get("processes") == 2 and again.path == cfg.path
    assert [(e.file, e.line) for e in again.expanded] == [(e.file, e.line) for e in cfg.expanded]
    with pytest.raises(ConfigError):
        from_json(b'{"path": "x", "entries": [[1]]}')


def test_placeholder_doubling_is_bounded(tmp_path):
    """%(k1) = %(k0)%(k0) and so on doubles at every level: 27 levels took the
    emperor to 2 GB and froze its loop (hostile-tenant review)."""
    import time

    lines = ["[uwsgi]", "k0 = " + "A" * 16] + [f"k{i} = %(k{i - 1})%(k{i - 1})" for i in range(1, 28)] + ["env = X=%(k27)"]
    f = write(tmp_path / "bomb.ini", "\n".join(lines) + "\n")
    started = time.monotonic()
    with pytest.raises(ConfigError) as err:
        load(str(f))
    assert time.monotonic() - started < 1.0
    assert "expands to more than" in str(err.value) and "bomb.ini" in str(err.value)
    # Many moderate values still add up to a bound for the whole config.
    many = write(tmp_path / "many.ini", "[uwsgi]\nbig = " + "B" * 60000 + "\n" + "".join(f"env = V{i}=%(big)\n" for i in range(60)))
    with pytest.raises(ConfigError, match="in all"):
        load(str(many))


@pytest.mark.parametrize("kind", ["ini-chain", "toml-nesting"])
def test_nesting_bombs_are_config_errors(tmp_path, kind):
    """A 400-deep %(a) chain or 3000-deep TOML arrays raised RecursionError
    out of the emperor's file handling (second review)."""
    if kind == "ini-chain":
        text = "[uwsgi]\n" + "".join(f"a{i} = %(a{i + 1})\n" for i in range(400)) + "a400 = x\nenv = X=%(a0)\n"
        f = write(tmp_path / "chain.ini", text)
    else:
        f = write(tmp_path / "deep.toml", "[vassal]\nenv = " + "[" * 3000 + "]" * 3000 + "\n")
    with pytest.raises(ConfigError) as err:
        load(str(f))
    assert "nested" in str(err.value)


def test_big_toml_is_refused_in_linear_time(tmp_path):
    """One line lookup per key made a 20000-key TOML file cost 75 s. Against
    the standard library's own (linear) parse of the same text, measured
    here, so a slow machine is not mistaken for a quadratic one."""
    import time
    import tomllib

    def timed(call) -> float:
        started = time.monotonic()
        call()
        return time.monotonic() - started

    for path, text in (
        (tmp_path / "q.toml", "[vassal]\n" + "".join(f'"k{i}" = 1\n' for i in range(19990))),
        (tmp_path / "list.toml", "[vassal]\nenv = [" + "0," * 520000 + "0]\n"),
    ):
        f = write(path, text)
        baseline = timed(lambda text=text: tomllib.loads(text))

        def refused(f=f):
            with pytest.raises(ConfigError, match="too many entries"):
                load(str(f))

        # (quadratic was some 800 times the baseline)
        assert timed(refused) < 20 * baseline + 0.1, path.name


def test_typed_reads_give_the_type_the_option_parsed(tmp_path):
    from bedrock.config import Entry, build

    f = str(tmp_path / "t.ini")
    config = build(f, [Entry("processes", "4", f, 1), Entry("cpu-limit", "1.5", f, 2), Entry("unshare", "net,pid", f, 3),
                       Entry("lazy-apps", "true", f, 4), Entry("chdir", "/srv", f, 5)])
    assert config.get_int("processes") == 4 and config.get_float("cpu-limit") == 1.5
    assert config.get_words("unshare") == ("net", "pid") and config.get_bool("lazy-apps") is True
    assert config.get_str("chdir") == "/srv"
    # unset: the option table's default, else the caller's
    assert config.get_int("listen") == 1024 and config.get_opt_int("cheaper") is None
    assert config.get_int("cheaper-step", 1) == 1 and config.get_words("pivot-root") == ()
    assert config.get_bool("memory-report") is False and config.get_opt_str("logto") is None
    assert config.get_float("processes") == 4.0  # an integer is a number


@pytest.mark.parametrize(("read", "key"), [("get_int", "cpu-limit"), ("get_int", "lazy-apps"), ("get_str", "processes"),
                                           ("get_words", "chdir"), ("get_bool", "processes")])
def test_a_typed_read_of_the_wrong_type_is_a_bug_not_a_config_error(tmp_path, read, key):
    from bedrock.config import Entry, build

    f = str(tmp_path / "t.ini")
    config = build(f, [Entry("processes", "4", f, 1), Entry("cpu-limit", "1.5", f, 2), Entry("lazy-apps", "true", f, 3),
                       Entry("chdir", "/srv", f, 4)])
    with pytest.raises(TypeError, match=key):
        getattr(config, read)(key)


def test_the_pyemperor_prefix_placeholder(tmp_path):
    """Where pyemperor runs from, for a jail that binds it in; a config's own
    definition of the name wins."""
    import sys

    f = tmp_path / "v.ini"
    f.write_text("[uwsgi]\nhttp-socket = 127.0.0.1:9000\nchdir = %(pyemperor-prefix)/x\n")
    assert load(str(f)).get("chdir") == f"{sys.prefix}/x"
    f.write_text("[uwsgi]\nhttp-socket = 127.0.0.1:9000\npyemperor-prefix = /elsewhere\nchdir = %(pyemperor-prefix)/x\n")
    assert load(str(f)).get("chdir") == "/elsewhere/x"
