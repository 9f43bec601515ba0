#!/usr/bin/env bash
# The files of deploy/ stay consistent with the daemon:
#   - deploy/clickmartd.conf lists every option of `clickmartd --help` exactly once, with
#     the default `--print-config` reports, commented out; uncommented (sections included)
#     it loads without error and changes nothing but the [kafka] and [experiment.*] parts;
#   - the options are documented: every one appears in docs (status.md, README.md or
#     deploy/README.md) or the sample config;
#   - deploy/docker-compose.yml parses as YAML (PyYAML, when installed) with the services
#     kafka (apache/kafka, KRaft), kafka-init, postgres and clickmartd (built from
#     deploy/Dockerfile), and the Dockerfile builds on debian:12;
#   - deploy/install-deps.sh is valid bash and installs what the operator tests need.
# No daemon, broker or Postgres needed; only the clickmartd binary.
#
# Run alone with: CLICKMART_BIN=build bash tests/integration/test_deploy_files.sh
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

cm_setup
cm_require clickmartd
D=$CLICKMART_SRC/deploy
passed=0

"$CLICKMART_BIN/clickmartd" --help >"$CM_DIR/help.txt"
"$CLICKMART_BIN/clickmartd" --print-config >"$CM_DIR/defaults.txt"
sed -n 's/^  --\([a-z0-9-]*\).*/\1/p' "$CM_DIR/help.txt" | grep -Ev '^(help|version|config|print-config)$' \
    >"$CM_DIR/options.txt"
[ "$(wc -l <"$CM_DIR/options.txt")" -ge 30 ] || cm_die "too few options parsed from --help"

# --- the sample config -------------------------------------------------------------------
"$CM_PY" - "$CM_DIR/options.txt" "$CM_DIR/defaults.txt" "$D/clickmartd.conf" <<'EOF' || cm_die "deploy/clickmartd.conf is out of date"
import re, sys
opts = open(sys.argv[1]).read().split()
defaults = dict(l.split(" = ", 1) if " = " in l else (l.rstrip(" ="), "")
                for l in open(sys.argv[2]).read().splitlines() if l and not l.startswith("["))
conf = open(sys.argv[3]).read().splitlines()
problems = []
for o in opts:
    lines = [l for l in conf if re.match(r"^# %s =( |$)" % re.escape(o), l)]
    if len(lines) != 1:
        problems.append("%s: %d lines '# %s = ...'" % (o, len(lines), o))
        continue
    val = lines[0].split("=", 1)[1].strip()
    if val != defaults.get(o, "").strip():
        problems.append("%s: sample says %r, the default is %r" % (o, val, defaults.get(o)))
for want in ("# [kafka]", "# security.protocol = SASL_SSL", "# sasl.mechanisms = SCRAM-SHA-512"):
    if want not in conf:
        problems.append("no %r" % want)
if not any(re.match(r"^# \[experiment\.\w+\]$", l) for l in conf):
    problems.append("no [experiment.NAME] example")
if problems:
    print("\n".join(problems))
    sys.exit(1)
print("sample config: %d options with their defaults" % len(opts))
EOF
passed=$((passed + 1))

# Uncomment every setting and section: the file must load and change only the sections.
sed -E 's/^# ((\[[a-z.A-Z_]+\])|([a-z][a-z0-9_.-]* =( .*)?))$/\1/' "$D/clickmartd.conf" >"$CM_DIR/all.conf"
"$CLICKMART_BIN/clickmartd" --config "$CM_DIR/all.conf" --print-config >"$CM_DIR/all.txt" 2>"$CM_DIR/all.err" ||
    cm_die "the uncommented sample config does not load: $(cat "$CM_DIR/all.err")"
sed -n '/^\[/q;p' "$CM_DIR/all.txt" | grep -v '^config = ' | sed '/^$/d' >"$CM_DIR/a"
grep -v '^config = ' "$CM_DIR/defaults.txt" >"$CM_DIR/b"
diff "$CM_DIR/b" "$CM_DIR/a" >&2 || cm_die "uncommented sample settings differ from the defaults"
grep -q '^\[kafka\]$' "$CM_DIR/all.txt" && grep -q '^sasl.password = \*\*\*$' "$CM_DIR/all.txt" ||
    cm_die "[kafka] section not loaded or the password not redacted: $(cat "$CM_DIR/all.txt")"
grep -q '^\[experiment.checkout_redesign\]$' "$CM_DIR/all.txt" &&
    grep -q '^weights = control:50,treatment:50$' "$CM_DIR/all.txt" ||
    cm_die "[experiment.*] section not loaded: $(cat "$CM_DIR/all.txt")"
# Flags win over the file.
"$CLICKMART_BIN/clickmartd" --config "$CM_DIR/all.conf" --topic other --print-config |
    grep -q '^topic = other$' || cm_die "a flag did not override the config file"
passed=$((passed + 1))

# --- every option is documented ---------------------------------------------------------
missing=()
while read -r o; do
    grep -q -- "$o" "$CLICKMART_SRC/docs/status.md" "$CLICKMART_SRC/README.md" "$D/README.md" \
        "$CLICKMART_SRC"/docs/*.md "$D/clickmartd.conf" || missing+=("$o")
done <"$CM_DIR/options.txt"
[ ${#missing[@]} -eq 0 ] || cm_die "options documented nowhere: ${missing[*]}"
for o in health-max-flush-age-ms http-listen print-config stats-log-interval-ms log-format; do
    grep -q -- "--$o" "$CLICKMART_SRC/docs/status.md" || cm_die "docs/status.md does not mention --$o"
done
passed=$((passed + 1))

# --- docker-compose.yml and the Dockerfile -----------------------------------------------
if "$CM_PY" -c 'import yaml' 2>/dev/null; then
    "$CM_PY" - "$D/docker-compose.yml" <<'EOF' || cm_die "deploy/docker-compose.yml is wrong"
import sys, yaml
d = yaml.safe_load(open(sys.argv[1]))
s = d["services"]
for name in ("kafka", "kafka-init", "postgres", "clickmartd"):
    assert name in s, "no service %s" % name
k = s["kafka"]
assert str(k["image"]).startswith("apache/kafka:"), k["image"]
env = k["environment"]
assert "controller" in env["KAFKA_PROCESS_ROLES"] and "broker" in env["KAFKA_PROCESS_ROLES"], "not KRaft"
assert len(env["CLUSTER_ID"]) == 22, "CLUSTER_ID must be a base64url UUID (22 characters)"
c = s["clickmartd"]
assert c["build"]["dockerfile"] == "deploy/Dockerfile" and c["build"]["context"] == "..", c["build"]
assert c["depends_on"]["postgres"]["condition"] == "service_healthy"
assert c["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"
assert any(a.startswith("--http-listen=") for a in c["command"]), c["command"]
assert s["postgres"]["image"].startswith("postgres:")
for name, svc in s.items():
    for p in svc.get("ports", []):
        assert str(p).startswith("127.0.0.1:"), "%s publishes %s beyond loopback" % (name, p)
print("docker-compose.yml: services", sorted(s))
EOF
else
    cm_log "PyYAML not installed: docker-compose.yml checked by grep only"
    grep -q '^  clickmartd:$' "$D/docker-compose.yml" && grep -q 'image: apache/kafka:' "$D/docker-compose.yml" ||
        cm_die "docker-compose.yml lacks its services"
fi
grep -q '^FROM debian:12 AS build$' "$D/Dockerfile" && grep -q '^FROM debian:12-slim$' "$D/Dockerfile" ||
    cm_die "the Dockerfile does not build on debian:12"
# Every Debian package the build stage installs is one install-deps.sh knows too.
for p in $(sed -n '/^FROM debian:12 AS build/,/^FROM/p' "$D/Dockerfile" | grep -oE '\blib[a-z0-9.+-]+-dev\b'); do
    grep -qw -- "$p" "$D/install-deps.sh" || cm_die "Dockerfile installs $p, install-deps.sh does not"
done
passed=$((passed + 1))

# --- install-deps.sh ----------------------------------------------------------------------
bash -n "$D/install-deps.sh" || cm_die "install-deps.sh is not valid bash"
for p in prometheus libsystemd-dev systemd chromium; do
    grep -qw -- "$p" "$D/install-deps.sh" || cm_die "install-deps.sh does not install $p"
done
passed=$((passed + 1))

cm_log "whole test $((SECONDS - CM_T0))s"
echo "$passed passed, 0 failed"
