"""docker/: the images' recipes, checked without a Docker engine (none runs here): pinned
installs, the uid the pods are told to run as, and a build context holding only what they copy."""

import re
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest

from regmix.config.cluster import IMAGE_UID

RECIPES = [Path("docker/Dockerfile"), Path("docker/mlflow.Dockerfile")]
VALUE_OPTIONS = {"-c", "-r", "--index-url", "--extra-index-url"}


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    lines = [line for line in dockerfile.read_text().splitlines()
             if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(parts[0].upper(), parts[1] if len(parts) > 1 else "")
            for line in joined.splitlines() if (parts := line.split(None, 1))]


def constraints() -> dict[str, str]:
    pins = (line.split("==") for line in Path("constraints.txt").read_text().splitlines()
            if "==" in line)
    return {name.lower().replace("_", "-"): version for name, version in pins}


def packages(pip_install: str) -> list[str]:
    """The requirements a `pip install` command names (options and their values left out)."""
    tokens = pip_install.split()
    named, skip = [], False
    for token in tokens[tokens.index("install") + 1:]:
        if not skip and not token.startswith("-") and token != ".":
            named.append(token)
        skip = token in VALUE_OPTIONS
    return named


@pytest.mark.parametrize("recipe", RECIPES, ids=str)
def test_every_pip_install_is_pinned_and_the_image_runs_as_the_pods_uid(recipe):
    steps = instructions(recipe)
    installs = [cmd for kind, args in steps if kind == "RUN"
                for cmd in args.split("&&") if "pip install" in cmd]
    assert installs
    pins = constraints()
    for cmd in installs:
        assert "-c" in cmd.split(), f"not constrained: {cmd}"
        for requirement in packages(cmd):  # what constraints.txt does not pin, the recipe does
            assert requirement in pins or "==" in requirement, requirement
    assert ("USER", f"{IMAGE_UID}:{IMAGE_UID}") in steps


def test_the_image_has_lightgbms_openmp_compilers_and_torch_in_a_layer_only_constraints_change():
    steps = instructions(Path("docker/Dockerfile"))

    def first_run(has) -> int:
        return next(i for i, (kind, args) in enumerate(steps) if kind == "RUN" and has(args))

    apt = first_run(lambda args: "apt-get install" in args)
    assert "libgomp1" in steps[apt][1].split()  # lightgbm's wheel links libgomp.so.1
    # torch.compile's compilers: Triton's launchers (gcc), inductor's CPU kernels (g++)
    assert {"gcc", "g++"} <= set(steps[apt][1].split())
    assert "rm -rf /var/lib/apt/lists/*" in steps[apt][1]
    assert apt < first_run(lambda args: "pip install" in args)
    torch = first_run(lambda args: any("torch" in packages(cmd) for cmd in args.split("&&")
                                       if "pip install" in cmd))
    copied_before = [src for kind, args in steps[:torch] if kind == "COPY"
                     for src in args.split()[:-1]]
    assert copied_before == ["constraints.txt"]  # a pyproject.toml edit keeps the torch layer


def test_the_project_dependencies_are_all_pinned_by_the_constraints():
    dependencies = tomllib.loads(Path("pyproject.toml").read_text())["project"]["dependencies"]
    pins = constraints()
    for dependency in dependencies:
        name = re.split(r"[<>=!~ ;\[]", dependency)[0].lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in constraints.txt"
    assert pins["torch"] == "2.13.0" and pins["kfp"] == "2.17.0"


def test_the_build_context_holds_exactly_what_the_recipes_copy():
    rules = [line for line in Path(".dockerignore").read_text().splitlines()
             if line and not line.startswith("#")]

    def ignored(path: str) -> bool:  # Docker's rule: the last matching pattern wins
        verdict = False
        for rule in rules:
            pattern = rule.removeprefix("!").rstrip("/")
            if fnmatch(path, pattern) or path.startswith(pattern + "/"):
                verdict = not rule.startswith("!")
        return verdict

    copied = [src for recipe in RECIPES for kind, args in instructions(recipe) if kind == "COPY"
              for src in args.split()[:-1]]
    for src in copied:
        assert Path(src).exists() and not ignored(src.rstrip("/")), src
    for private in (".venv", "mlruns", ".git", "tests", "k8s", "data"):
        assert ignored(private), private
