"""`distshare env`: what a bug report needs: versions, devices, distributed backends."""

from __future__ import annotations

import argparse
import json
import os
import platform

from distshare.commands.common import versions
from distshare.config import SHIPPED_CONFIGS
from distshare.distributed import launchers


def env_command_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("env", help="versions, devices and backends, for bug reports", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=env_command)
    return parser


def environment() -> dict:
    import torch
    import torch.distributed as dist

    info: dict = {"platform": platform.platform(), "cpu_count": os.cpu_count(), **versions()}
    info["torch_threads"] = torch.get_num_threads()
    info["cuda_available"] = torch.cuda.is_available()
    info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    info["backends"] = {
        "gloo": dist.is_available() and dist.is_gloo_available(),
        "nccl": dist.is_available() and dist.is_nccl_available(),
        "mpi": dist.is_available() and dist.is_mpi_available(),
    }
    info["launcher_env"] = launchers.launcher_environment()
    # Where the shipped configs are, for a pip install: `accelerate launch --config_file <configs>/accelerate/cpu.yaml`.
    info["configs"] = str(SHIPPED_CONFIGS)
    return info


def env_command(args: argparse.Namespace) -> int:
    info = environment()
    if args.json:
        print(json.dumps(info))
        return 0
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
        elif isinstance(value, list):
            value = ", ".join(value) or "-"
        print(f"- {key}: {value}")
    return 0
