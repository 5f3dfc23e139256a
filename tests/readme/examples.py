"""Runs every example in README.md as a newcomer would, from the repository root.

Usage: python tests/readme/examples.py path/to/limitlab   (run by .ci/run, after the SDK step)

Every fenced block of the README is claimed by exactly one step below, and a block
no step claims fails the run: a new example cannot go untested. The commands the
prose gives inline are listed in INLINE; each must still be in the README word for
word. Commands run as written, through bash, with `limitlab` on PATH as the given
binary (as `cargo install --path limitlab` would put it) and CARGO_TARGET_DIR set to
the checkout's `target/`, so that cargo reuses what CI already built. What a
comment in a block promises (`# recommended: ...`, `# listening on ...`) is checked
against the output.

Run elsewhere: `cargo test --workspace` (.ci/run's test step), the GitHub Actions
steps (.ci/run runs them verbatim), the SDK check (.ci/run runs that line) and the
two-minute loop of `simulate`, `load --local` and `compare` (.ci/run runs those
commands; this script checks that they are there).
Not run: `benches/proxy-bench.sh` (it needs nginx and oha and minutes of load;
docs/performance.md has its figures), and pointing the proxy or `limitlab load`
at a real Azure deployment or APIM instance (they need one; the flags the APIM
example uses are checked against `--help`).
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
README = os.path.join(ROOT, "README.md")
PORTS = (8080, 8081, 8082, 9090, 6380, 8090, 8091, 8092, 9190, 9191, 9192)


class Block:
    def __init__(self, lang, text, line):
        self.lang, self.text, self.line = lang, text, line

    def commands(self):
        """The block's commands: continuation lines joined, comments and blanks dropped."""
        joined = self.text.replace("\\\n", " ")
        return [l for l in joined.splitlines() if l.strip() and not l.lstrip().startswith("#")]

    def promises(self):
        """What the block's `# ...` comment lines say the output contains."""
        return [l.lstrip()[2:].strip() for l in self.text.splitlines() if l.lstrip().startswith("# ")]


def blocks(text):
    found, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m or not m.group(1):
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        found.append(Block(m.group(1), "\n".join(lines[i + 1 : end]) + "\n", i + 1))
        i = end + 1
    return found


class Runner:
    def __init__(self, limitlab):
        self.bin = tempfile.mkdtemp(prefix="limitlab-readme-bin-")
        os.symlink(os.path.abspath(limitlab), os.path.join(self.bin, "limitlab"))
        self.env = dict(os.environ, PATH=f"{self.bin}:{os.environ['PATH']}", CARGO_TARGET_DIR=os.path.join(ROOT, "target"))
        self.servers = []

    def sh(self, command, timeout=600, expect_code=0):
        print(f"$ {command}", flush=True)
        done = subprocess.run(["bash", "-c", command], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
        if expect_code is not None and done.returncode != expect_code:
            fail(f"`{command}` exited {done.returncode}, not {expect_code}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done

    def serve(self, command, ready):
        """Starts a command that serves until stopped; waits for each line of `ready` in its output."""
        print(f"$ {command} &", flush=True)
        proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        self.servers.append(proc)
        seen = []
        for want in ready:
            while True:
                line = proc.stdout.readline()
                if not line:
                    fail(f"`{command}` ended before printing `{want}`; it printed {seen}")
                seen.append(line.strip())
                if line.strip() == want:
                    break
        return proc

    def stop_servers(self):
        for proc in self.servers:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.servers:
            proc.wait(timeout=60)
        self.servers = []


def fail(message):
    raise SystemExit(f"README example failed: {message}")


def expect(condition, message):
    if not condition:
        fail(message)


def port_is_free(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


# The steps, each claiming blocks by their first line.

def quick_start(run, block):
    (command,) = block.commands()
    run.sh(command, timeout=1800)
    # "Same scenario and seed, the same bytes. A committed copy is in examples/reports/seed-ip-limits/."
    committed = os.path.join(ROOT, "examples/reports/seed-ip-limits")
    for name in sorted(os.listdir(committed)):
        with open(os.path.join(committed, name), "rb") as a, open(os.path.join(ROOT, "reports/seed-ip-limits", name), "rb") as b:
            expect(a.read() == b.read(), f"reports/seed-ip-limits/{name} differs from the committed copy")


def run_elsewhere(run, block):
    print(f"(README line {block.line}: {block.commands()} runs in .ci/run)")


def policy_tools(run, block):
    check, imported = block.commands()
    out = run.sh(check).stdout
    expect("policies/seed-ip-limits.xml: understood" in out, out)
    toml = run.sh(imported).stdout
    expect(tomllib.loads(toml)["limits"], f"the import is not a native policy:\n{toml}")


def sweep(run, block):
    (command,) = block.commands()
    out = run.sh(command).stdout
    for promise in block.promises():
        expect(promise in out, f"the README promises `{promise}`; the sweep printed:\n{out}")


def promises_in_ci(run, block):
    # The `[[expect]]`/`[check]` snippet on a scenario whose own promises are set aside.
    scenario = open(os.path.join(ROOT, "scenarios/tenant-tpm.toml")).read().split("\n[[expect]]", 1)[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "promised.toml")
        with open(path, "w") as f:
            f.write(scenario + "\n" + block.text)
        done = run.sh(f"limitlab check {path} --cases 3 --out {tmp}/out", expect_code=None)
        expect(done.returncode in (0, 1), f"the snippet is not a valid check: {done.stderr}")


def mock(run, block):
    run.stop_servers()
    (command,) = block.commands()
    run.serve(command, ["listening on http://127.0.0.1:8081"])


def mock_faults(run, block):
    faults, stats = block.commands()
    expect('"outages":[{' in run.sh(faults).stdout, "the fault was not set")
    expect('"deployments"' in run.sh(stats).stdout, "no stats")
    run.stop_servers()


def proxy(run, block):
    commands = block.commands()
    ready = [p for p in block.promises()]
    for command in commands[:-1]:
        if command.endswith("&"):
            run.serve(command[:-1].strip(), [f"listening on http://{command.split('--listen ')[1].split()[0]}"])
        else:
            run.sh(command, timeout=1800)
    run.serve(commands[-1], ready)


def proxy_calls(run, block):
    chat, metrics = block.commands()
    out = run.sh(chat).stdout
    expect(out.startswith("HTTP/1.1 200"), f"the chat call through the proxy:\n{out}")
    expect("limitlab_" in run.sh(metrics).stdout, "no limitlab metrics")


def proxy_sdk(run, block):
    done = subprocess.run([sys.executable, "-c", block.text], cwd=ROOT, capture_output=True, text=True, timeout=120)
    expect(done.returncode == 0, f"the SDK example: {done.stderr}")
    expect("ChatCompletion(" in done.stdout, done.stdout)
    expect("ResponseUsage(input_tokens=" in done.stdout, done.stdout)
    run.stop_servers()


def start_fleet(run, block):
    # The README's mocks, then its Redis and three replicas.
    for port in (8081, 8082):
        run.serve(f"limitlab mock --listen 127.0.0.1:{port}", [f"listening on http://127.0.0.1:{port}"])
    replicas = []
    for command in block.commands():
        command = command.rstrip("&").strip()
        if command.startswith("sed "):
            done = run.sh(command)
            expect(done.returncode == 0, f"{command}: {done.stderr}")
            continue
        if command.startswith("redis-server"):
            run.serve(command, [])
            port = int(command.split("--port ")[1].split()[0])
            wait_for_port(port)
            continue
        listen = command.split("--listen ")[1].split()[0]
        run.serve(command, [f"listening on http://{listen}"])
        replicas.append((listen, command.split("--admin ")[1].split()[0]))
    return replicas


def fleet_call(run, listen):
    out = run.sh(f"curl -s -o /dev/null -w '%{{http_code}}' http://{listen}/openai/deployments/gpt-4o/chat/completions"
                 "?api-version=2024-10-21 -H 'api-key: demo-key' "
                 "-d '{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}], \"max_tokens\": 5}'").stdout
    return out == "200"


def fleet(run, block):
    replicas = start_fleet(run, block)
    # Five rounds over the three replicas, two sync intervals apart: shared
    # counters admit 12 of the 15 calls (a round after the limit is reached is
    # still admitted by every replica), counting alone would admit all 15.
    admitted = 0
    for _ in range(5):
        for listen, _admin in replicas:
            admitted += fleet_call(run, listen)
        time.sleep(2.2)
    expect(10 <= admitted <= 12, f"the fleet admitted {admitted} of 15 calls under a limit of 10")
    metrics = run.sh(f"curl -s http://{replicas[0][1]}/metrics").stdout
    expect("limitlab_store_reachable 1" in metrics and "limitlab_store_changes_applied_total 0" not in metrics, metrics)
    run.stop_servers()


def fleet_exact(run, block):
    replicas = start_fleet(run, block)
    # Fifteen calls, one replica after another with no pause: exactly 10 pass.
    admitted = sum(fleet_call(run, replicas[i % 3][0]) for i in range(15))
    expect(admitted == 10, f"the exact fleet admitted {admitted} of 15 calls under a limit of 10")
    metrics = run.sh(f"curl -s http://{replicas[0][1]}/metrics").stdout
    expect("limitlab_store_reachable 1" in metrics and "limitlab_store_local_calls_total 0" in metrics, metrics)
    run.stop_servers()


def wait_for_port(port):
    for _ in range(500):
        if not port_is_free(port):
            return
        time.sleep(0.02)
    fail(f"nothing listens on port {port}")


def live_loop(run, block):
    # The loop takes two minutes of wall-clock time: .ci/run runs these very
    # commands (with the binary it built), so they are checked to be there.
    ci = open(os.path.join(ROOT, ".ci/run")).read()
    for command in block.commands():
        expect(command.replace("limitlab ", "target/release/limitlab ", 1) in ci, f"`{command}` is not run by .ci/run")
    expect("limitlab compare" in block.text and "within tolerance" in " ".join(block.promises()), block.text)


def load_against_apim(run, block):
    # A real APIM instance is out of reach: every flag the example uses must be
    # one `limitlab load` and `limitlab compare` take.
    help_text = run.sh("limitlab load --help").stdout + run.sh("limitlab compare --help").stdout
    for flag in re.findall(r"(--[a-z][a-z-]*)", block.text):
        expect(flag in help_text, f"`{flag}` is not a flag of limitlab load or compare")


def policy_toml(run, block):
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "my-policy.toml"), "w") as f:
            f.write(block.text)
        done = subprocess.run(["bash", "-c", "limitlab policy check my-policy.toml"], cwd=tmp, env=run.env,
                              capture_output=True, text=True)
        expect(done.returncode == 0, done.stderr)
        run.my_policy = block.text


def policy_mistake(run, block):
    # The README's policy with the mistake its prose names.
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "my-policy.toml"), "w") as f:
            f.write(run.my_policy.replace("renewal_period = 60 ", "renewal_period = 400", 1))
        done = subprocess.run(["bash", "-c", "limitlab policy check my-policy.toml"], cwd=tmp, env=run.env,
                              capture_output=True, text=True)
        expect(done.returncode == 2 and done.stderr == block.text, f"got:\n{done.stderr}\nthe README shows:\n{block.text}")


STEPS = [
    ("sh", "cargo run --release -p limitlab -- simulate", quick_start),
    ("sh", "cargo test --workspace", run_elsewhere),
    ("sh", "limitlab policy check policies/seed-ip-limits.xml", policy_tools),
    ("sh", "limitlab sweep ", sweep),
    ("toml", "[[expect]]", promises_in_ci),
    ("yaml", "# .github/workflows/policy-check.yml", run_elsewhere),
    ("sh", "cargo run --release -p limitlab -- mock", mock),
    ("sh", "curl -X POST localhost:8081/_mock/faults", mock_faults),
    ("sh", "cargo build --release -p limitlab", proxy),
    ("sh", 'curl -i "http://127.0.0.1:8080/', proxy_calls),
    ("python", "from openai import AzureOpenAI", proxy_sdk),
    ("sh", "redis-server --port 6380", fleet),
    ("sh", "sed 's/^mode = \"lagged\"/mode = \"exact\"/'", fleet_exact),
    ("sh", "limitlab simulate scenarios/live-loop.toml", live_loop),
    ("sh", "limitlab load scenarios/your-scenario.toml --target", load_against_apim),
    ("toml", "[[limits]]", policy_toml),
    ("text", "my-policy.toml:", policy_mistake),
]


def inline(run, readme):
    """The commands the prose gives inline, as written."""
    for command in [
        "cargo install --path limitlab",
        "cargo bench -p limitlab-benches --bench simulate -- 24h",
        "limitlab decide POLICY REQUESTS",
        "examples/decide-requests.jsonl",
        "limitlab check SCENARIO [--cases 100] [--seed 1]",
        "scenarios/tenant-tpm-raised.toml",
        "python3 -m venv .venv && .venv/bin/pip install openai && .venv/bin/python tests/sdk/openai_sdk.py target/release/limitlab",
    ]:
        expect(command in readme.replace("\n", " "), f"the README no longer says `{command}`: update {__file__}")
    with tempfile.TemporaryDirectory() as root:
        run.sh(f"cargo install --locked --path limitlab --root {root}", timeout=1800)
        version = run.sh(f"{root}/bin/limitlab --version").stdout
        expect(version.startswith("limitlab "), version)
    out = run.sh("cargo bench -p limitlab-benches --bench simulate -- 24h", timeout=1800).stdout
    expect(re.search(r"simulate 24h: 864\d{5} client calls", out), out)
    print(out.strip())
    out = run.sh("limitlab decide policies/seed-ip-limits.xml examples/decide-requests.jsonl").stdout
    expect("admitted" in out.splitlines()[-1], out)
    # tenant-tpm-raised breaks a promise: exit 1 and a failing case that replays.
    run.sh("limitlab check scenarios/tenant-tpm-raised.toml --cases 20", expect_code=1)
    run.sh("limitlab simulate reports/tenant-tpm-raised-check/failing-case.toml --out target/readme-failing-case")


def main():
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    busy = [p for p in PORTS if not port_is_free(p)]
    expect(not busy, f"the README's examples use ports {PORTS}; in use: {busy}")
    readme = open(README).read()
    run = Runner(sys.argv[1])
    try:
        for block in blocks(readme):
            claimed = [step for lang, head, step in STEPS if block.lang == lang and block.text.startswith(head)]
            expect(len(claimed) == 1, f"README line {block.line}: a ```{block.lang} block that {len(claimed)} steps claim")
            print(f"== README line {block.line}: {claimed[0].__name__}", flush=True)
            claimed[0](run, block)
        inline(run, readme)
    finally:
        run.stop_servers()
        shutil.rmtree(run.bin)
    print(f"every README example ran: {len(blocks(readme))} blocks and the inline commands")


if __name__ == "__main__":
    main()
