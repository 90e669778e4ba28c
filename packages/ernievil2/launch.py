"""Launching: `ernievil2-infer` / `ernievil2-train` (and run_infer.sh / run_train.sh /
run_zeroshot.sh, which call this module) start one process or several, as the official
run_infer.sh does.

    ernievil2-infer DEVICES CONFIG [key=value ...] [-v]

DEVICES means what it means in the official script (CUDA_VISIBLE_DEVICES): "2" runs one process on
card 2; a list "0,1,2,3" runs one process per entry under paddle.distributed.launch (`--devices`
with a GPU; without one every entry is one CPU process, gloo). CONFIG is a YAML path or a shipped
config's name (demo_tiny).

Several machines: run the same command on every machine with NNODES (the number of machines),
MASTER (host:port of the first machine, a free port there) and NODE_RANK (0 on the first machine,
1, 2, ... on the others; unset, the machines get their ranks in the order they join) in the
environment; DEVICES lists each machine's own cards (or CPU processes). The machines need no
shared folder: rank 0 (the first machine) writes inference's output, every machine keeps
training checkpoints in its own output_dir.

With several processes the launcher's own output and every process's log go to LAUNCH_LOG_DIR
(default: the config's log_dir/launch); the console shows rank 0's output without the launcher's
configuration dump and glog lines (-v shows everything), and a failure on any rank ends with that
rank's one-line error and exit status 1.

This module imports neither paddle nor the engine: a single process sets CUDA_VISIBLE_DEVICES
before paddle is loaded.
"""
import argparse
import codecs
import json
import os
import re
import site
import signal
import subprocess
import sys

from .resources import run_config_path

COMMANDS = {"infer": "run_infer.sh", "train": "run_train.sh", "zeroshot": "run_zeroshot.sh"}
_ACTIONS = {"infer": "Embed a TSV (text \\t image_id \\t base64 image) with ERNIE-ViL 2.0.",
            "train": "Train ERNIE-ViL 2.0 (multi-view contrastive learning).",
            "zeroshot": "Zero-shot classification accuracy on labelled images (eval_zeroshot.py)."}
# The module each command's processes run: `python -m MODULE [COMMAND] ARGS`.
WORKERS = {"infer": ["ernievil2.cli", "infer"], "train": ["ernievil2.cli", "train"],
           "zeroshot": ["ernievil2.zeroshot_cli"]}
ZEROSHOT_USAGE = ("--classes FILE --images TSV_OR_FOLDER [--lang zh|en] [--templates FILE] "
                  "[--json OUT]")
# glog lines, e.g. "W1203 09:31:35.988 12345 init.cc:88] ..."
GLOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\]")
# the launcher's rendezvous requests of a multi-machine job, e.g.
# "[2026-12-03 12:41:14,634] [    INFO] _client.py:1025 - HTTP Request: GET http://..."
RENDEZVOUS_LINE = re.compile(r"^\[[\d\- :,]+\] \[ *\w+\] \S+\.py:\d+ - HTTP Request: ")
LAUNCHER_LINE = "LAUNCH "
LAUNCHER_ERROR = "LAUNCH ERROR"
BANNER_START = re.compile(r"^=+ Modified FLAGS detected =+$")  # paddle's init_parallel_env
BANNER_END = re.compile(r"^=+$")
TRACEBACK_STARTS = ("Traceback (most recent call last):",
                    "During handling of the above exception, another exception occurred:",
                    "The above exception was the direct cause of the following exception:")


class LaunchError(ValueError):
    """A bad command line (devices, environment): one line, exit status 2."""


def parse_devices(devices):
    """"2" -> ["2"]; "0,1,2,3" -> ["0", "1", "2", "3"]."""
    if not re.fullmatch(r"\d+(,\d+)*", devices or ""):
        raise LaunchError(f"DEVICES must be a card id or a comma-separated list of ids, got {devices!r}")
    return devices.split(",")


def build_parser(command):
    script = COMMANDS[command]
    extra = f" {ZEROSHOT_USAGE}" if command == "zeroshot" else ""
    p = argparse.ArgumentParser(
        prog=f"bash {script} (or ernievil2-{command})",
        usage=f"bash {script} DEVICES CONFIG [key=value ...]{extra} [-v]",
        description=f"{_ACTIONS[command]}\n\n" + "\n\n".join(__doc__.split("\n\n")[2:5]),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("devices", metavar="DEVICES",
                   help='a card id ("2": one process) or a list ("0,1,2,3": one process per entry)')
    if command == "zeroshot":
        from .zeroshot_cli import add_arguments
        add_arguments(p)
    else:
        p.add_argument("config", metavar="CONFIG", help="YAML config path, or a shipped config's name")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of config keys")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show the launcher's and Paddle's own output on the console too")
    return p


def has_gpu(python=sys.executable):
    """Asked in a child process, so the launcher itself never holds a CUDA context."""
    probe = ("import paddle; print(int(paddle.device.is_compiled_with_cuda() and "
             "paddle.device.cuda.device_count() > 0))")
    r = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    return r.stdout.strip().endswith("1")


def _package_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker_env(error_dir, verbose, base=None):
    """The environment of every process: the same ernievil2 as this launcher, glog quiet unless -v,
    and where a failing process leaves its one-line error."""
    from .cli import ERROR_DIR_ENV
    env = dict(os.environ if base is None else base)
    root = _package_root()
    if root not in site.getsitepackages() + [site.getusersitepackages()]:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    if not verbose:
        env.setdefault("GLOG_minloglevel", "2")
        # paddle's warning on import (about compiling custom operators, which nothing here does)
        env.setdefault("PYTHONWARNINGS", "ignore:No ccache found")
    env[ERROR_DIR_ENV] = os.path.abspath(error_dir)
    return env


def launch_log_dir(log_dir):
    """Where the launcher and the processes' own logs go: LAUNCH_LOG_DIR, else LOG_DIR/launch."""
    return os.environ.get("LAUNCH_LOG_DIR") or os.path.join(log_dir, "launch")


def launch_command(command, devices, config, overrides, log_dir, gpu, nnodes=None, master=None,
                   python=sys.executable, node_rank=None, options=()):
    """The paddle.distributed.launch command line of a multi-process run (options: the
    command's own, e.g. zero-shot's --classes)."""
    cmd = [python, "-m", "paddle.distributed.launch", "--log_dir", log_dir]
    if nnodes:
        if not master:
            raise LaunchError("set MASTER=host:port for several machines (NNODES is set)")
        if not re.fullmatch(r"[1-9]\d*", str(nnodes)):
            raise LaunchError(f"NNODES must be the number of machines, got {nnodes!r}")
        cmd += ["--nnodes", str(nnodes), "--master", master]
        if node_rank:
            if not (re.fullmatch(r"\d+", str(node_rank)) and int(node_rank) < int(nnodes)):
                raise LaunchError(f"NODE_RANK must be 0 .. NNODES-1 = {int(nnodes) - 1}, "
                                  f"got {node_rank!r}")
            cmd += ["--rank", str(node_rank)]
    elif node_rank:
        raise LaunchError("NODE_RANK is set without NNODES (the number of machines) and MASTER")
    if gpu:
        cmd += ["--devices", ",".join(devices)]
    else:  # --devices fails without a GPU; each entry = one CPU process
        cmd += ["--nproc_per_node", str(len(devices))]
    return cmd + [python, "-u", "-m", *WORKERS[command], config, *overrides, *options]


class ConsoleFilter:
    """Passes the launcher's output (its own lines and rank 0's log) to the console, minus the
    launcher's configuration and status lines, Paddle's FLAGS banner, glog lines and tracebacks
    (each process's traceback stays in its workerlog; the launcher ends with the cause's one
    line); with verbose, everything. After the launcher reports a failed process, its dump of
    that process's log stays in the log too. Every line also goes to the launcher's log file."""

    def __init__(self, console, logfile, verbose):
        self.console, self.logfile, self.verbose = console, logfile, verbose
        self.failed = False
        self.shown = set()  # console lines that may hold an error message
        self._pending = ""
        self._block = None  # "traceback" or "banner" while inside one

    def feed(self, text):
        self._pending += text
        while True:
            cut = min((i for i in (self._pending.find("\n"), self._pending.find("\r")) if i >= 0),
                      default=-1)
            if cut < 0:
                return
            self._emit(self._pending[:cut + 1])
            self._pending = self._pending[cut + 1:]

    def close(self):
        if self._pending:
            self._emit(self._pending)
            self._pending = ""

    def _hidden(self, line):
        if line.startswith(LAUNCHER_ERROR):
            self.failed = True
        if (self.failed or line.startswith(LAUNCHER_LINE) or GLOG_LINE.match(line)
                or RENDEZVOUS_LINE.match(line)):
            return True
        if self._block == "banner":
            if BANNER_END.match(line):
                self._block = None
            return True
        if BANNER_START.match(line):
            self._block = "banner"
            return True
        if line.startswith(TRACEBACK_STARTS):
            self._block = "traceback"
            return True
        if self._block == "traceback":
            if line and not line[0].isspace():
                self._block = None  # the exception's own line ends the traceback
            return True
        return False

    def _emit(self, segment):
        self.logfile.write(segment)
        line = segment.rstrip("\r\n")
        if self._hidden(line) and not self.verbose:
            return
        if "rror" in line:  # what the launcher need not print again at the end
            self.shown.add(line.strip())
        self.console.write(segment)
        self.console.flush()


def read_errors(error_dir):
    """The one-line errors the processes left, the cause first: user errors before anything else
    (a peer's collective timeout or termination follows the real failure), then by time."""
    records = []
    for name in sorted(os.listdir(error_dir)) if os.path.isdir(error_dir) else []:
        if name.startswith("error.rank") and name.endswith(".json"):
            try:
                with open(os.path.join(error_dir, name), encoding="utf-8") as f:
                    records.append(json.load(f))
            except (OSError, ValueError):
                continue
    return sorted(records, key=lambda r: (not r.get("user_error"), r.get("time", 0), r.get("rank", 0)))


def clear_errors(error_dir):
    for name in os.listdir(error_dir):
        if name.startswith("error.rank") and name.endswith(".json"):
            os.remove(os.path.join(error_dir, name))


def run_single(command, devices, config, overrides, verbose, options=()):
    """One process: this one, on card DEVICES (as the official script's CUDA_VISIBLE_DEVICES)."""
    os.environ["CUDA_VISIBLE_DEVICES"] = devices[0]
    if not verbose:
        os.environ.setdefault("GLOG_minloglevel", "2")
    if command == "zeroshot":
        from .cli import run_main
        from .zeroshot_cli import run
        return run_main(run, [config, *overrides, *options]) or 0
    from . import cli
    return cli.main([command, config, *overrides])


def run_multi(command, devices, config, overrides, verbose, options=()):
    from .cli import check_config, run_main

    def check(_):  # zero-shot runs on an inference config
        return check_config("train" if command == "train" else "infer", config, overrides)
    cfg = run_main(check)  # a bad config: one line here, before any process starts
    config_path = os.path.abspath(run_config_path(config))
    log_dir = launch_log_dir(cfg.log_dir)
    os.makedirs(log_dir, exist_ok=True)
    clear_errors(log_dir)
    cmd = launch_command(command, devices, config_path, overrides, log_dir, has_gpu(),
                         os.environ.get("NNODES"), os.environ.get("MASTER"),
                         node_rank=os.environ.get("NODE_RANK"), options=options)
    launcher_log = os.path.join(log_dir, "launcher.log")
    with open(launcher_log, "a", encoding="utf-8") as logfile:
        logfile.write(" ".join(cmd) + "\n")
        out = ConsoleFilter(sys.stdout, logfile, verbose)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=worker_env(log_dir, verbose))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

        def relay():
            while True:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                out.feed(decoder.decode(chunk))
            out.feed(decoder.decode(b"", final=True))
            out.close()
            return proc.wait()

        try:
            rc = relay()
        except KeyboardInterrupt:
            # the workers got the signal too: training saves a checkpoint and says so; show it
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            relay()
            if not any(line.startswith("interrupted") for line in out.shown):
                print("interrupted (Ctrl-C): nothing was written under the final names",
                      file=sys.stderr)
            return 130
    errors = read_errors(log_dir)
    if rc == 0 and not errors:
        return 0
    if rc in (130, 143) and not errors:
        return rc  # interrupted: each worker printed its own line
    interrupted = bool(errors) and all(e["message"].startswith("interrupted") for e in errors)
    if errors:
        first = errors[0]
        if not any(first["message"].strip() in line for line in out.shown):
            # a machine's processes are ranks k*n .. k*n+n-1, logged as workerlog.0 .. n-1
            where = os.path.join(log_dir, f"workerlog.{first['rank'] % len(devices)}")
            what = "log" if first.get("user_error") else "traceback"
            # a peer's failure reaches this machine as a collective's timeout or a lost connection
            elsewhere = ("; the cause may be on another machine: see its console"
                         if os.environ.get("NNODES") and not first.get("user_error") else "")
            print(f"{first['message']} (rank {first['rank']}; {what}: {where}{elsewhere})",
                  file=sys.stderr)
        if interrupted:
            return 130
    else:
        print(f"error: a process failed (exit status {rc}); see {log_dir}/workerlog.* and "
              f"{launcher_log}", file=sys.stderr)
    return 1


def launch(command, devices, config, overrides=(), verbose=False, options=()):
    """Run COMMAND (infer, train or zeroshot) on DEVICES; returns the exit status. options:
    the command's own (zero-shot's --classes, --images, ...)."""
    devices = parse_devices(devices)
    if len(devices) == 1 and not os.environ.get("NNODES"):
        return run_single(command, devices, config, list(overrides), verbose, list(options))
    return run_multi(command, devices, config, list(overrides), verbose, list(options))


def main(argv=None):
    """`python -m ernievil2.launch infer|train|zeroshot DEVICES CONFIG [key=value ...] [-v]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m ernievil2.launch {{{','.join(COMMANDS)}}} DEVICES CONFIG "
              "[key=value ...] [-v]", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    verbose = any(a in ("-v", "--verbose") for a in rest)  # allowed anywhere, also after overrides
    parser = build_parser(command)
    rest = [a for a in rest if a not in ("-v", "--verbose")]
    if len(rest) < 2 and not {"-h", "--help"} & set(rest):
        parser.error("DEVICES and CONFIG are required")
    options = []
    if command == "zeroshot":  # its options may come between or after the key=value overrides
        from .zeroshot_cli import option_args
        args = parser.parse_intermixed_args(rest)
        options = option_args(args)
    else:
        args = parser.parse_args(rest)
    try:
        return launch(command, args.devices, args.config, args.overrides, verbose, options)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def infer_main(argv=None):
    """Console script ernievil2-infer."""
    sys.exit(main(["infer", *(sys.argv[1:] if argv is None else argv)]))


def train_main(argv=None):
    """Console script ernievil2-train."""
    sys.exit(main(["train", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
