# RabbitMQ for the container tests, from Debian's package on a local base image (no registry
# is reachable where the tests run; tests/python/test_containers.py builds the base with
# debootstrap). Users with a registry run the official `rabbitmq` image instead.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends rabbitmq-server \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb
# What the official image's RABBITMQ_DEFAULT_USER/PASS do, and the management plugin.
RUN printf '%s\n' \
        'default_user = iam-gateway' \
        'default_pass = change-me-compose-only' \
        'default_user_tags.administrator = true' \
        'loopback_users = none' \
        'listeners.tcp.default = 5672' \
        > /etc/rabbitmq/rabbitmq.conf \
    && echo '[rabbitmq_management].' > /etc/rabbitmq/enabled_plugins \
    && echo 'NODENAME=rabbit@localhost' > /etc/rabbitmq/rabbitmq-env.conf
USER rabbitmq
EXPOSE 5672 15672
CMD ["rabbitmq-server"]
