#!/usr/bin/env bash
# Gives the local RabbitMQ an amqps listener for the test suite. A CA and a server certificate
# for the name localhost are made in DIR (not for 127.0.0.1, so a test can reach the listener
# by a name the certificate does not hold), and the listener is started in the running broker
# (`rabbitmqctl eval`). No configuration file is touched; the listener lasts until the broker
# restarts. Idempotent: a listener that already verifies against DIR/ca.pem is left alone.
#
#   scripts/broker-tls-listener.sh [DIR]     (port: CREDIT_WORKER_TEST_AMQPS_PORT, default 5671)
#
# DIR also gets other-ca.pem, a CA that signed nothing, for the refusal tests.
set -euo pipefail
dir=${1:-/var/lib/rabbitmq/credit-worker-test-tls}
port=${CREDIT_WORKER_TEST_AMQPS_PORT:-5671}
mkdir -p "$dir"
cd "$dir"

verifies() {
  openssl s_client -connect "127.0.0.1:$port" -servername localhost -CAfile ca.pem \
    -verify_return_error -verify_hostname localhost </dev/null >/dev/null 2>&1
}

make_certificates() {
  openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 30 \
    -subj "/CN=credit-worker test CA" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr \
    -subj "/CN=localhost" 2>/dev/null
  printf 'subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n' > server.ext
  openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem \
    -days 30 -extfile server.ext 2>/dev/null
  openssl req -x509 -newkey rsa:2048 -nodes -keyout other-ca.key -out other-ca.pem -days 30 \
    -subj "/CN=credit-worker other CA" 2>/dev/null
  # The broker's user reads the key; nobody else needs to.
  if id rabbitmq >/dev/null 2>&1; then chown rabbitmq server.key server.pem ca.pem; fi
  chmod 600 server.key ca.key other-ca.key
  chmod 644 ca.pem other-ca.pem server.pem
}

if [ -s ca.pem ] && [ -s other-ca.pem ] && openssl x509 -checkend 86400 -noout -in server.pem >/dev/null 2>&1 \
   && verifies; then
  echo "amqps listener on 127.0.0.1:$port already verifies against $dir/ca.pem"
  exit 0
fi
if [ ! -s server.pem ] || ! openssl x509 -checkend 86400 -noout -in server.pem >/dev/null 2>&1 \
   || [ ! -s other-ca.pem ]; then
  make_certificates
fi
listener="{\"127.0.0.1\", $port}"
options="[{cacertfile, \"$dir/ca.pem\"}, {certfile, \"$dir/server.pem\"}, {keyfile, \"$dir/server.key\"}, {verify, verify_none}, {fail_if_no_peer_cert, false}]"
# Erlang caches PEM files by name: clear it so fresh certificates are read.
result=$(rabbitmqctl eval "ssl:clear_pem_cache(), catch rabbit_networking:stop_tcp_listener($listener), rabbit_networking:start_ssl_listener($listener, $options, 1, 1).")
if [ "$result" != "ok" ]; then
  echo "cannot start the amqps listener: $result" >&2
  exit 1
fi
for _ in $(seq 50); do
  if verifies; then
    echo "amqps listener on 127.0.0.1:$port, CA $dir/ca.pem"
    exit 0
  fi
  sleep 0.1
done
echo "the amqps listener on 127.0.0.1:$port does not verify against $dir/ca.pem" >&2
exit 1
