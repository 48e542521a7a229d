// Package deploy holds no code: it is the home of the deployment files (the
// Kubernetes manifests, the Prometheus configuration and alert rules, the Grafana
// dashboard and the OpenTelemetry collector configuration) and of the tests that keep
// them valid and consistent with the metrics the streamer exports.
package deploy
