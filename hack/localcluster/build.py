"""Build the control-plane binaries from their published Go modules, once, into a cache.

Kubernetes itself (`k8s.io/kubernetes`) is not meant to be consumed as a module: its
go.mod replaces every `k8s.io/*` staging module with a path inside the repository. We
build it through a throwaway wrapper module whose go.mod replaces each of those staging
modules with its published `v0.<minor>.<patch>` release; the list is generated from the
real go.mod of the tag, never written by hand. etcd's server module has the same
problem and gets the same treatment. kwok and helm install with plain `go install`.

Binaries land in `$NEOX_CACHE/bin/<versions>/` (default `~/.cache/neox/...`), and
only missing ones are rebuilt.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import versions

CACHE_ROOT = Path(os.environ.get("NEOX_CACHE", Path.home() / ".cache" / "neox"))


def bin_dir() -> Path:
    """Directory holding the binaries for the pinned versions."""
    key = f"k8s-{versions.KUBERNETES}_etcd-{versions.ETCD}_kwok-{versions.KWOK}_helm-{versions.HELM}"
    return CACHE_ROOT / "bin" / key


def binary(name: str) -> Path:
    return bin_dir() / name


ALL_BINARIES = (*versions.KUBE_BINARIES, "etcd", "kwok", "kwokctl", "helm")


def missing_binaries() -> list[str]:
    return [name for name in ALL_BINARIES if not binary(name).exists()]


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    env["CGO_ENABLED"] = "0"
    env.setdefault("GOFLAGS", "-mod=mod")
    return env


def _go(args: list[str], cwd: Path) -> str:
    proc = subprocess.run(["go", *args], cwd=cwd, env=_go_env(), text=True, capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"go {' '.join(args)} failed in {cwd}:\n{proc.stderr[-4000:]}")
    return proc.stdout


def _module_gomod(module: str, version: str, cwd: Path) -> str:
    """Text of the go.mod that `module@version` publishes, via the module proxy."""
    info = json.loads(_go(["mod", "download", "-json", f"{module}@{version}"], cwd))
    return Path(info["GoMod"]).read_text()


def staging_replacements(kubernetes_gomod: str, kube_version: str) -> dict[str, str]:
    """Map each locally replaced `k8s.io/*` module to its published v0.x.y release.

    The kubernetes go.mod holds lines like `k8s.io/api => ./staging/src/k8s.io/api`;
    the staging module `k8s.io/api` is published as `v0.<minor>.<patch>` of the tag.
    """
    major_minor_patch = kube_version.lstrip("v").split(".")
    published = f"v0.{major_minor_patch[1]}.{major_minor_patch[2]}"
    pattern = re.compile(r"^\s*(k8s\.io/[\w.\-/]+)\s*=>\s*\./staging/src/\S+\s*$", re.M)
    return {module: published for module in pattern.findall(kubernetes_gomod)}


def _write_wrapper(workdir: Path, module: str, requires: dict[str, str],
                   replaces: dict[str, str], tool_imports: list[str]) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    lines = [f"module {module}", "", "go 1.24", "", "require ("]
    lines += [f"\t{mod} {ver}" for mod, ver in requires.items()]
    lines += [")", ""]
    if replaces:
        lines += ["replace ("]
        lines += [f"\t{mod} => {mod} {ver}" for mod, ver in sorted(replaces.items())]
        lines += [")", ""]
    (workdir / "go.mod").write_text("\n".join(lines))
    imports = "\n".join(f'\t_ "{imp}"' for imp in tool_imports)
    (workdir / "tools.go").write_text(f"//go:build tools\n\npackage tools\n\nimport (\n{imports}\n)\n")


def _version_ldflags(kube_version: str) -> str:
    major, minor, _ = kube_version.lstrip("v").split(".")
    build_date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    values = {"gitVersion": kube_version, "gitMajor": major, "gitMinor": minor,
              "gitTreeState": "clean", "buildDate": build_date}
    flags = [f"-X {pkg}.{key}={value}" for pkg in
             ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version")
             for key, value in values.items()]
    return "-s -w " + " ".join(flags)


def build_kubernetes(out: Path, work: Path) -> None:
    version = versions.KUBERNETES
    workdir = work / f"kubernetes-{version}"
    workdir.mkdir(parents=True, exist_ok=True)
    replaces = staging_replacements(_module_gomod("k8s.io/kubernetes", version, workdir), version)
    if not replaces:
        raise RuntimeError("found no staging replacements in the kubernetes go.mod")
    packages = [f"k8s.io/kubernetes/cmd/{name}" for name in versions.KUBE_BINARIES]
    _write_wrapper(workdir, "neox.local/kubernetes-build", {"k8s.io/kubernetes": version},
                   replaces, packages)
    _go(["mod", "tidy"], workdir)
    _go(["build", "-trimpath", "-ldflags", _version_ldflags(version), "-o", str(out) + "/", *packages],
        workdir)


def build_etcd(out: Path, work: Path) -> None:
    workdir = work / f"etcd-{versions.ETCD}"
    _write_wrapper(workdir, "neox.local/etcd-build", {"go.etcd.io/etcd/server/v3": versions.ETCD},
                   {}, ["go.etcd.io/etcd/server/v3"])
    _go(["mod", "tidy"], workdir)
    _go(["build", "-trimpath", "-ldflags", "-s -w", "-o", str(out / "etcd"),
         "go.etcd.io/etcd/server/v3"], workdir)


def _go_install(out: Path, work: Path, package: str, ldflags: str = "") -> None:
    env_out = dict(GOBIN=str(out))
    proc = subprocess.run(["go", "install", "-trimpath", "-ldflags", f"-s -w {ldflags}".strip(), package],
                          cwd=work, env={**_go_env(), **env_out, "GOFLAGS": ""},
                          text=True, capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"go install {package} failed:\n{proc.stderr[-4000:]}")


def build_kwok(out: Path, work: Path) -> None:
    for cmd in ("kwok", "kwokctl"):
        _go_install(out, work, f"sigs.k8s.io/kwok/cmd/{cmd}@{versions.KWOK}")


def build_helm(out: Path, work: Path) -> None:
    _go_install(out, work, f"helm.sh/helm/v3/cmd/helm@{versions.HELM}",
                ldflags=f"-X helm.sh/helm/v3/internal/version.version={versions.HELM}")


BUILDERS = {
    "kubernetes": (versions.KUBE_BINARIES, build_kubernetes),
    "etcd": (("etcd",), build_etcd),
    "kwok": (("kwok", "kwokctl"), build_kwok),
    "helm": (("helm",), build_helm),
}


def ensure_built(log=print) -> Path:
    """Build whatever is missing; return the binary directory."""
    out = bin_dir()
    if shutil.which("go") is None and missing_binaries():
        raise RuntimeError("Go is needed to build the control plane, and `go` is not on PATH")
    work = CACHE_ROOT / "build"
    for group, (names, builder) in BUILDERS.items():
        if all(binary(n).exists() for n in names):
            continue
        staging = out.parent / (out.name + f".partial-{group}")
        staging.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        log(f"Building {group} ({', '.join(names)}) into {out}")
        builder(staging, work)
        out.mkdir(parents=True, exist_ok=True)
        for name in names:
            # Move only when complete, so an interrupted build never leaves a half binary.
            os.replace(staging / name, out / name)
        shutil.rmtree(staging, ignore_errors=True)
        log(f"Built {group} in {time.monotonic() - started:.0f}s")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print-dir", action="store_true", help="print the binary directory and exit")
    args = parser.parse_args(argv)
    if args.print_dir:
        print(bin_dir())
        return 0
    ensure_built(log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(bin_dir())
    return 0


if __name__ == "__main__":
    sys.exit(main())
