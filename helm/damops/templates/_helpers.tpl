{{/* The chart name, or nameOverride. */}}
{{- define "damops.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The prefix of every object name: fullnameOverride, else the release name if it contains the chart name, else <release>-<name>. */}}
{{- define "damops.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "damops.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "damops.labels" -}}
app.kubernetes.io/name: {{ include "damops.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: damops
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "damops.operatorSelector" -}}
app.kubernetes.io/name: {{ include "damops.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* Labels of the worker pods the operator creates (set by the operator, not by the chart). */}}
{{- define "damops.workerSelector" -}}
app.kubernetes.io/component: worker
app.kubernetes.io/managed-by: damops-operator
{{- end -}}

{{- define "damops.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}{{ default (include "damops.fullname" .) .Values.serviceAccount.name }}{{- else -}}{{ default "default" .Values.serviceAccount.name }}{{- end -}}
{{- end -}}

{{/* An image reference: repository@digest when a digest is given, else repository:tag (tag default: the chart's appVersion).
     Call with (dict "image" .Values.image.operator "context" $). */}}
{{- define "damops.image" -}}
{{- $image := .image -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository (default .context.Chart.AppVersion (toString (default "" $image.tag))) -}}
{{- end -}}
{{- end -}}

{{/* imagePullSecrets of a pod spec; call only when .Values.imagePullSecrets is not empty. */}}
{{- define "damops.imagePullSecrets" -}}
imagePullSecrets:
{{- range .Values.imagePullSecrets }}
  - name: {{ if kindIs "string" . }}{{ . }}{{ else }}{{ .name }}{{ end }}
{{- end }}
{{- end -}}

{{/* Namespaces that may hold WorkerPools of this operator: the release namespace, operator.watchNamespaces, networkPolicy.workerNamespaces. */}}
{{- define "damops.workerNamespaces" -}}
{{- if .Values.operator.watchNamespaces -}}
{{- toJson (uniq (concat .Values.operator.watchNamespaces .Values.networkPolicy.workerNamespaces)) -}}
{{- else -}}
{{- toJson (uniq (prepend .Values.networkPolicy.workerNamespaces .Release.Namespace)) -}}
{{- end -}}
{{- end -}}

{{/* The Secret + key holding DATABASE_URL, whichever way it is given. */}}
{{- define "damops.databaseSecretName" -}}
{{- if .Values.database.existingSecret.name -}}{{ .Values.database.existingSecret.name }}{{- else -}}{{ include "damops.fullname" . }}-database{{- end -}}
{{- end -}}
{{- define "damops.databaseSecretKey" -}}
{{- if .Values.database.existingSecret.name -}}{{ .Values.database.existingSecret.key }}{{- else -}}url{{- end -}}
{{- end -}}

{{- define "damops.validate" -}}
{{- $given := list -}}
{{- if .Values.database.existingSecret.name }}{{ $given = append $given "database.existingSecret.name" }}{{ end -}}
{{- if .Values.database.url }}{{ $given = append $given "database.url" }}{{ end -}}
{{- if .Values.database.postgresql.enabled }}{{ $given = append $given "database.postgresql.enabled" }}{{ end -}}
{{- if eq (len $given) 0 -}}
{{- fail (printf `

damops needs a PostgreSQL database and none is configured. Give exactly one of:
  --set database.existingSecret.name=SECRET   a Secret in namespace %s whose key "url" (database.existingSecret.key) holds postgresql://USER:PASSWORD@HOST:5432/DB (production)
  --set database.url=postgresql://USER:PASSWORD@HOST:5432/DB   the chart stores the URL in a Secret
  --set database.postgresql.enabled=true      a bundled single-pod PostgreSQL, to try damops out (not for production)
` .Release.Namespace) -}}
{{- else if gt (len $given) 1 -}}
{{- fail (printf "\n\ndamops: give exactly one of database.existingSecret.name, database.url, database.postgresql.enabled=true; these are all set: %s\n" (join ", " $given)) -}}
{{- end -}}
{{- if and .Values.tracing.enabled (not .Values.tracing.endpoint) -}}
{{- fail "\n\ndamops: tracing.enabled=true needs tracing.endpoint, the OTLP endpoint of your collector (e.g. --set tracing.endpoint=http://otel-collector.observability:4318)\n" -}}
{{- end -}}
{{- if and .Values.operator.metrics.serviceMonitor.enabled (not .Values.operator.metrics.service) -}}
{{- fail "\n\ndamops: operator.metrics.serviceMonitor.enabled=true needs operator.metrics.service=true (the ServiceMonitor selects that Service)\n" -}}
{{- end -}}
{{- end -}}

{{/* The test WorkerPool's namespace: the release namespace when the operator watches it, else the first watched namespace. */}}
{{- define "damops.testNamespace" -}}
{{- $w := .Values.operator.watchNamespaces -}}
{{- if or (empty $w) (has .Release.Namespace $w) -}}{{ .Release.Namespace }}{{- else -}}{{ first $w }}{{- end -}}
{{- end -}}

{{/* The tracing variables (tracing.*) as Pod env entries: the operator's and, through DAMOPS_WORKER_ENV, every worker's. */}}
{{- define "damops.tracingEnv" -}}
{{- $env := list -}}
{{- with .Values.tracing -}}
{{- if .enabled -}}
{{- $env = append $env (dict "name" "DAMOPS_TRACING" "value" "true") -}}
{{- $env = append $env (dict "name" "OTEL_EXPORTER_OTLP_ENDPOINT" "value" .endpoint) -}}
{{- with .protocol }}{{ $env = append $env (dict "name" "OTEL_EXPORTER_OTLP_PROTOCOL" "value" .) }}{{ end -}}
{{- if not (kindIs "invalid" .sampleRatio) -}}
{{- $env = append $env (dict "name" "OTEL_TRACES_SAMPLER" "value" "parentbased_traceidratio") -}}
{{- $env = append $env (dict "name" "OTEL_TRACES_SAMPLER_ARG" "value" (toString .sampleRatio)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toJson $env -}}
{{- end -}}
