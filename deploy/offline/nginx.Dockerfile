# Stand-in for the nginx image on a machine that cannot pull images (scripts/compose_e2e):
# Debian's nginx-light (1.22, grpc and http2 built in) on the locally built base.
ARG BASE_IMAGE=nereid-base:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx-light \
    && rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/*
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
