"""Manifest parsing and resolution: every error names the file, the key and a hint."""

from __future__ import annotations

from pathlib import Path

import pytest

from afterclose.harness.errors import ManifestError
from afterclose.harness.manifest import (
    available_targets,
    builtin_targets_dir,
    load_manifest,
    resolve_target,
)


def write(tmp_path: Path, text: str, name: str = "t.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_for(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    message = str(info.value)
    assert str(path) in message, message
    return message


def test_minimal_manifest_defaults(tmp_path: Path) -> None:
    m = load_manifest(write(tmp_path, 'name = "s"\ncommand = ["./srv", "{port}"]\n'))
    assert m.name == "s"
    assert m.command == ("./srv", "{port}")
    assert m.ready.strategy == "port"
    assert m.ready.timeout_s == 10
    assert m.folder == tmp_path
    assert m.tracer == "auto"


def test_full_manifest(tmp_path: Path) -> None:
    (tmp_path / "s.c").write_text("int main(void){return 0;}\n")
    m = load_manifest(
        write(
            tmp_path,
            """
name = "full"
description = "d"
command = ["{build}", "{host}", "{port}"]
build = ["true"]
env = {A = "{port}"}
files = {"conf" = "listen {host}:{port};"}
echo_path = true
fd_grace_s = 0.5
stop_signal = "SIGINT"
[compile]
sources = ["s.c"]
cflags = ["-O2"]
[ready]
log = "READY"
timeout_s = 3
""",
        )
    )
    assert m.compile is not None and m.compile.sources == (tmp_path / "s.c",)
    assert m.ready.strategy == "log" and m.ready.log == "READY" and m.ready.timeout_s == 3
    assert m.env == {"A": "{port}"} and m.files == {"conf": "listen {host}:{port};"}
    assert m.echo_path and m.fd_grace_s == 0.5 and m.stop_signal == "SIGINT"


def test_missing_file() -> None:
    with pytest.raises(ManifestError, match="manifest file not found"):
        load_manifest(Path("/nonexistent/afterclose/target.toml"))


def test_invalid_toml(tmp_path: Path) -> None:
    message = error_for(tmp_path, "name = s\n")
    assert "invalid TOML" in message and "Hint:" in message


def test_missing_name(tmp_path: Path) -> None:
    message = error_for(tmp_path, 'command = ["x"]\n')
    assert "missing required key 'name'" in message and "Hint: add name" in message


def test_missing_command(tmp_path: Path) -> None:
    assert "missing required key 'command'" in error_for(tmp_path, 'name = "x"\n')


def test_unknown_key_suggests_close_match(tmp_path: Path) -> None:
    message = error_for(tmp_path, 'name = "x"\ncommand = ["x"]\necho_paths = true\n')
    assert "unknown key 'echo_paths'" in message
    assert "did you mean 'echo_path'?" in message


def test_unknown_key_in_table(tmp_path: Path) -> None:
    message = error_for(tmp_path, 'name = "x"\ncommand = ["x"]\n[ready]\ntimeout = 3\n')
    assert "unknown key 'ready.timeout'" in message
    assert "did you mean 'ready.timeout_s'?" in message


def test_wrong_types(tmp_path: Path) -> None:
    message = error_for(tmp_path, 'name = "x"\ncommand = "./srv"\n')
    assert "key 'command': expected a list of strings" in message
    message = error_for(tmp_path, 'name = "x"\ncommand = ["x"]\necho_path = "yes"\n')
    assert "key 'echo_path': expected true or false" in message
    message = error_for(tmp_path, 'name = "x"\ncommand = ["x"]\n[ready]\ntimeout_s = -1\n')
    assert "key 'ready.timeout_s'" in message and "greater than 0" in message
    message = error_for(tmp_path, 'name = "x"\ncommand = []\n')
    assert "must not be empty" in message


def test_bad_choice_lists_allowed(tmp_path: Path) -> None:
    message = error_for(tmp_path, 'name = "x"\ncommand = ["x"]\ntracer = "strace"\n')
    assert "key 'tracer'" in message and "auto, preload, ebpf, off" in message


def test_two_readiness_strategies(tmp_path: Path) -> None:
    message = error_for(tmp_path, 'name = "x"\ncommand = ["x"]\n[ready]\nlog = "R"\nhttp = "/"\n')
    assert "choose one readiness strategy" in message


def test_bad_placeholder(tmp_path: Path) -> None:
    message = error_for(tmp_path, 'name = "x"\ncommand = ["./srv", "{prot}"]\n')
    assert "bad placeholder in command[1]" in message and "{port}" in message


def test_build_placeholder_needs_compile(tmp_path: Path) -> None:
    message = error_for(tmp_path, 'name = "x"\ncommand = ["{build}"]\n')
    assert "[compile]" in message


def test_compile_source_missing(tmp_path: Path) -> None:
    message = error_for(
        tmp_path, 'name = "x"\ncommand = ["{build}"]\n[compile]\nsources = ["nope.c"]\n'
    )
    assert "key 'compile.sources'" in message and "'nope.c' not found" in message


def test_docker_table_takes_one_source_at_most(tmp_path: Path) -> None:
    message = error_for(
        tmp_path,
        'name = "x"\ncommand = ["x"]\n[docker]\nimage = "a"\ndockerfile = "Dockerfile"\n',
    )
    assert "one of image or dockerfile, not both" in message


def test_docker_privileges_without_an_image_keep_the_closure_image(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'name = "x"\ncommand = ["x"]\n[docker]\ncap_add = ["net_bind_service", "CAP_SETUID"]\n'
        'user = "root"\n',
    )
    spec = load_manifest(path).docker
    assert spec is not None and spec.image is None and spec.dockerfile is None
    assert spec.cap_add == ("NET_BIND_SERVICE", "SETUID") and spec.user == "root"


def test_docker_unknown_capability_is_named(tmp_path: Path) -> None:
    message = error_for(
        tmp_path, 'name = "x"\ncommand = ["x"]\n[docker]\ncap_add = ["NET_BIND_SERVIC"]\n'
    )
    assert "key 'docker.cap_add'" in message and "unknown capability 'NET_BIND_SERVIC'" in message
    assert "did you mean 'NET_BIND_SERVICE'?" in message


def test_resolve_by_name_in_rootdir(tmp_path: Path) -> None:
    (tmp_path / "targets" / "mine").mkdir(parents=True)
    flat = write(tmp_path / "targets", 'name = "flat"\ncommand = ["x"]\n', "flat.toml")
    nested = write(tmp_path / "targets" / "mine", 'name = "mine"\ncommand = ["x"]\n', "target.toml")
    assert resolve_target("flat", tmp_path) == flat
    assert resolve_target("mine", tmp_path) == nested
    assert {"flat", "mine"} <= set(available_targets(tmp_path))


def test_resolve_path_and_folder(tmp_path: Path) -> None:
    path = write(tmp_path, 'name = "p"\ncommand = ["x"]\n', "target.toml")
    assert resolve_target(str(path), None) == path
    assert resolve_target("./target.toml", None, cwd=tmp_path) == path
    assert resolve_target(str(tmp_path) + "/", None) == path


def test_rootdir_shadows_builtin(tmp_path: Path) -> None:
    (tmp_path / "targets").mkdir()
    mine = write(tmp_path / "targets", 'name = "seed-fixed"\ncommand = ["x"]\n', "seed-fixed.toml")
    assert resolve_target("seed-fixed", tmp_path) == mine


def test_unknown_target_lists_tried_paths_and_suggests(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as info:
        resolve_target("seed-buggyy", tmp_path)
    message = str(info.value)
    assert "unknown target 'seed-buggyy'" in message
    assert str(tmp_path / "targets" / "seed-buggyy.toml") in message
    assert "did you mean 'seed-buggy'?" in message


def test_builtin_manifests_are_valid() -> None:
    names = available_targets(None)
    assert {"seed-buggy", "seed-fixed"} <= set(names)
    for name in names:
        manifest = load_manifest(resolve_target(name, None))
        # A target in a group folder is listed as group/name (zoo/h2o-1427) and named by its own.
        assert manifest.name == name.rpartition("/")[2]
        assert manifest.path.is_relative_to(builtin_targets_dir())
