#!/usr/bin/env bash
# The production profile, tested: PostgreSQL + RabbitMQ from Debian packages, a core.psql_dos profile,
# then the same daemon test the default suite runs on the embedded SQLite/ZeroMQ profile (10 submitted
# reconstructions, daemon stopped mid-way and started again, results identical to in-process runs).
#
#   sudo bash scripts/production_check.sh          # installs the packages when missing (Debian/Ubuntu)
#
# It leaves the services running and the profile in $AUTOMAT_PROD_DIR (default: a new temp folder).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=.venv/bin/python
[ -x "$PY" ] || { echo "run 'bash scripts/install.sh' first" >&2; exit 1; }

if ! command -v pg_ctlcluster >/dev/null || ! command -v rabbitmq-server >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql rabbitmq-server >/dev/null
fi

# PostgreSQL: the Debian cluster, a role and a database for this check.
version=$(ls /usr/lib/postgresql | sort -n | tail -1)
pg_ctlcluster "$version" main start 2>/dev/null || true
for _ in $(seq 30); do pg_isready -q && break; sleep 1; done
db="automat_check_$(date +%s)"
su postgres -c "psql -qc \"DO \\\$\\\$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname='automat') THEN CREATE ROLE automat LOGIN PASSWORD 'automat'; END IF; END\\\$\\\$;\""
su postgres -c "createdb -O automat $db"

# RabbitMQ: the Debian server, detached. RabbitMQ ≥ 3.8.15 cancels a task unacknowledged for 30 min
# (consumer_timeout), which kills long workflows: switch that off, as AiiDA's documentation asks.
if [ ! -f /etc/rabbitmq/advanced.config ]; then
    echo '[{rabbit, [{consumer_timeout, undefined}]}].' > /etc/rabbitmq/advanced.config
    rabbitmqctl stop >/dev/null 2>&1 || true
fi
if ! rabbitmqctl status >/dev/null 2>&1; then
    rabbitmq-server -detached
    for _ in $(seq 60); do rabbitmqctl status >/dev/null 2>&1 && break; sleep 2; done
fi
rabbitmqctl status >/dev/null

export AIIDA_PATH="${AUTOMAT_PROD_DIR:-$(mktemp -d -t automat-prod-XXXXXX)}"
mkdir -p "$AIIDA_PATH"
.venv/bin/verdi profile setup core.psql_dos --non-interactive --profile-name production --set-as-default \
    --email automat@localhost --first-name A --last-name U --institution X \
    --database-hostname localhost --database-port 5432 --database-name "$db" \
    --database-username automat --database-password automat \
    --repository-uri "file://$AIIDA_PATH/repository-production" --broker core.rabbitmq
.venv/bin/verdi config set warnings.rabbitmq_version False  # consumer_timeout is off (above)
.venv/bin/verdi status

# The daemon test against this profile (it creates its own localhost computer and codes there).
AUTOMAT_DAEMON_AIIDA_PATH="$AIIDA_PATH" .venv/bin/python -m pytest tests/aiida/test_daemon.py -q -p no:cacheprovider "$@"
