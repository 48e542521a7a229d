# syntax=docker/dockerfile:1
#
# outbox-streamer image: a static binary on distroless, running as a non-root user.
#   docker build -t outbox-streamer .
#   docker run --rm -e DATABASE_URL=... -e CLICKHOUSE_HOST=... outbox-streamer          # run
#   docker run --rm -e DATABASE_URL=... outbox-streamer migrate up                     # migrate
# Inside a container set METRICS_ADDR=0.0.0.0:8187 to reach /metrics from outside
# (the binary's default is loopback only).

FROM golang:1.26 AS build
WORKDIR /src
# Dependencies first: this layer stays cached while only the sources change.
# go.mod replaces the producer module with ./outbox, whose go.mod is read too.
COPY go.mod go.sum ./
COPY outbox/go.mod outbox/go.sum ./outbox/
RUN go mod download
COPY . .
# The version the binary reports (version, outbox_streamer_build_info):
#   docker build --build-arg VERSION=$(git describe --always --dirty) .
ARG VERSION=dev
# CGO_ENABLED=0: a static binary that needs no libc in the final image.
RUN CGO_ENABLED=0 GOOS=linux go build -trimpath -ldflags="-s -w -X main.version=${VERSION}" -o /out/outbox-streamer ./cmd/outbox-streamer

# distroless/static has CA certificates and tzdata (EVENT_TIME_ZONE) and no shell.
FROM gcr.io/distroless/static-debian12:nonroot
ARG VERSION=dev
LABEL org.opencontainers.image.title="outbox-streamer" \
      org.opencontainers.image.description="PostgreSQL transactional outbox to ClickHouse through logical replication" \
      org.opencontainers.image.version="${VERSION}"
COPY --from=build /out/outbox-streamer /usr/local/bin/outbox-streamer
# nonroot is uid/gid 65532; numeric so Kubernetes' runAsNonRoot can verify it.
USER 65532:65532
EXPOSE 8187
ENTRYPOINT ["/usr/local/bin/outbox-streamer"]
CMD ["run"]
