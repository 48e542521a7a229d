{{/* The chart's name, app.kubernetes.io/name of everything (63 characters at most). */}}
{{- define "outbox-streamer.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The resources' names: the release name, prefixed with the chart's unless it holds it. */}}
{{- define "outbox-streamer.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "outbox-streamer.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The streamer pods' labels that the Deployment, the Service and the PodDisruptionBudget select by. */}}
{{- define "outbox-streamer.selectorLabels" -}}
app.kubernetes.io/name: {{ include "outbox-streamer.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "outbox-streamer.labels" -}}
helm.sh/chart: {{ include "outbox-streamer.chart" . }}
{{ include "outbox-streamer.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: outbox-streamer
{{- end }}

{{- define "outbox-streamer.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* The Secret the streamer pods read secret.keys from. */}}
{{- define "outbox-streamer.secretName" -}}
{{- .Values.secret.existingSecret | default (include "outbox-streamer.fullname" .) }}
{{- end }}

{{/*
The settings the binary treats as secret (`outbox-streamer run --help` shows them as
"(secret)"; deploy_test.go checks this list against it). They may only come from the
Secret: env refuses them.
*/}}
{{- define "outbox-streamer.secretSettings" -}}
DATABASE_URL POSTGRES_PASSWORD CLICKHOUSE_URI CLICKHOUSE_PASSWORD SENTRY_CONFIG_DSN SENTRY_DSN
{{- end }}

{{/*
GOMEMLIMIT: goMemLimit, or about 90% of resources.limits.memory in MiB (the limit
given in Mi or Gi); empty without a memory limit or with goMemLimit "off".
*/}}
{{- define "outbox-streamer.goMemLimit" -}}
{{- $mem := "" }}
{{- with .Values.resources }}{{ with .limits }}{{ $mem = toString (.memory | default "") }}{{ end }}{{ end }}
{{- if eq (toString .Values.goMemLimit) "off" }}
{{- else if .Values.goMemLimit }}
{{- .Values.goMemLimit }}
{{- else if regexMatch "^[0-9]+Gi$" $mem }}
{{- printf "%dMiB" (div (mul (trimSuffix "Gi" $mem | atoi) 1024 9) 10) }}
{{- else if regexMatch "^[0-9]+Mi$" $mem }}
{{- printf "%dMiB" (div (mul (trimSuffix "Mi" $mem | atoi) 9) 10) }}
{{- else if $mem }}
{{- fail (printf "resources.limits.memory %q: give it as a whole number of Mi or Gi, or set goMemLimit (e.g. 900MiB, about 90%% of the limit) or goMemLimit: off" $mem) }}
{{- end }}
{{- end }}

{{/*
The environment of the streamer and of the migration Job alike: env, METRICS_ADDR,
GOMEMLIMIT, secret.keys from the Secret named secretName, extraEnv.
Called with (dict "root" $ "secretName" NAME).
*/}}
{{- define "outbox-streamer.env" -}}
{{- $root := .root }}
{{- $secretSettings := splitList " " (include "outbox-streamer.secretSettings" $root) }}
{{- $secretKeys := list }}
{{- range $root.Values.secret.keys }}{{ $secretKeys = append $secretKeys .name }}{{ end }}
{{- range $name, $value := $root.Values.env }}
{{- if has $name $secretSettings }}
{{- fail (printf "env.%s is a secret: list it in secret.keys and put its value in the Secret, not in env" $name) }}
{{- else if has $name $secretKeys }}
{{- fail (printf "env.%s is also in secret.keys: set it in one place" $name) }}
{{- else if eq $name "METRICS_ADDR" }}
{{- fail "env.METRICS_ADDR: set metrics.port instead (the pod must listen on 0.0.0.0 for Prometheus and the probes)" }}
{{- else if eq $name "GOMEMLIMIT" }}
{{- fail "env.GOMEMLIMIT: set goMemLimit instead" }}
{{- end }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
# Pods are isolated network namespaces: listen beyond loopback (the binary's default)
# so that Prometheus and the kubelet's probes reach the endpoint.
- name: METRICS_ADDR
  value: {{ printf "0.0.0.0:%d" (int $root.Values.metrics.port) | quote }}
{{- with include "outbox-streamer.goMemLimit" $root }}
# About 90% of the container's memory limit: the garbage collector works harder near
# it instead of the kernel killing the pod at the limit (see values.yaml, goMemLimit).
- name: GOMEMLIMIT
  value: {{ . | quote }}
{{- end }}
{{- range $root.Values.secret.keys }}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ $.secretName }}
      key: {{ .key | default .name }}
      {{- if .optional }}
      optional: true
      {{- end }}
{{- end }}
{{- $names := concat (keys ($root.Values.env | default dict)) $secretKeys (list "METRICS_ADDR" "GOMEMLIMIT") }}
{{- range $root.Values.extraEnv }}
{{- if has .name $names }}
{{- fail (printf "extraEnv %s is set by the chart already (env, secret.keys, METRICS_ADDR or GOMEMLIMIT): drop it there (env.%s: null) or here" .name .name) }}
{{- end }}
{{- end }}
{{- with $root.Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The pod's and the container's security context, for the streamer and the Job alike. */}}
{{- define "outbox-streamer.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "outbox-streamer.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end }}

{{/*
The content of the Secret the chart creates (secret.existingSecret ""): secret.values,
every key of secret.keys that is not optional required, no key that nothing reads.
*/}}
{{- define "outbox-streamer.secretData" -}}
{{- $values := .Values.secret.values | default dict }}
{{- $names := list }}
{{- range .Values.secret.keys }}
{{- $key := .key | default .name }}
{{- $names = append $names $key }}
{{- if and (not .optional) (not (get $values $key)) }}
{{- fail (printf "secret.existingSecret is empty, so the chart creates the Secret: set secret.values.%s (or name an existing Secret in secret.existingSecret)" $key) }}
{{- end }}
{{- end }}
{{- range $k, $v := $values }}
{{- if not (has $k $names) }}
{{- fail (printf "secret.values.%s: no entry of secret.keys reads it" $k) }}
{{- end }}
{{ $k }}: {{ $v | toString | quote }}
{{- end }}
{{- end }}
