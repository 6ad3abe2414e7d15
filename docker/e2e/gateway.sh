#!/bin/sh
# The gateway on Debian 12's nginx, for docker/e2e.sh on a host that reaches no container
# registry: what the pinned nginx-unprivileged image's entrypoint does with the same mounts
# (docker-compose.yml's gateway service). Fills /etc/nginx/templates/*.template with the
# LUNAFL_* variables (NGINX_ENVSUBST_FILTER), then runs nginx as the container's non-root
# user with every writable path under /tmp (podman's tmpfs on /etc/nginx/conf.d is root's).
set -eu
vars=$(env | sed -n 's/^\(LUNAFL_[A-Z0-9_]*\)=.*/${\1}/p' | tr '\n' ' ')
mkdir -p /tmp/conf.d
for t in /etc/nginx/templates/*.template; do
    envsubst "$vars" < "$t" > "/tmp/conf.d/$(basename "$t" .template)"
done
cat > /tmp/nginx.conf <<CONF
worker_processes 1;
pid /tmp/nginx.pid;
error_log stderr warn;
daemon off;
events { worker_connections 256; }
http {
    access_log off;
    client_body_temp_path /tmp/client_body;
    proxy_temp_path /tmp/proxy;
    fastcgi_temp_path /tmp/fastcgi;
    uwsgi_temp_path /tmp/uwsgi;
    scgi_temp_path /tmp/scgi;
    include /tmp/conf.d/*.conf;
}
CONF
exec nginx -e stderr -c /tmp/nginx.conf
