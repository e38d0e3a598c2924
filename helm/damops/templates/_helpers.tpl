{{- define "damops.fullname" -}}
{{- if contains "damops" .Release.Name -}}{{ .Release.Name | trunc 63 | trimSuffix "-" }}{{- else -}}{{ printf "%s-damops" .Release.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "damops.labels" -}}
app.kubernetes.io/name: damops
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "damops.operatorSelector" -}}
app.kubernetes.io/name: damops
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "damops.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}{{ default (include "damops.fullname" .) .Values.serviceAccount.name }}{{- else -}}{{ default "default" .Values.serviceAccount.name }}{{- end -}}
{{- end -}}

{{/* The Secret + key holding DATABASE_URL, whichever way it is given. */}}
{{- define "damops.databaseSecretName" -}}
{{- if .Values.database.existingSecret.name -}}{{ .Values.database.existingSecret.name }}{{- else -}}{{ include "damops.fullname" . }}-database{{- end -}}
{{- end -}}
{{- define "damops.databaseSecretKey" -}}
{{- if .Values.database.existingSecret.name -}}{{ .Values.database.existingSecret.key }}{{- else -}}url{{- end -}}
{{- end -}}

{{- define "damops.validate" -}}
{{- $n := 0 -}}
{{- if .Values.database.existingSecret.name }}{{ $n = add1 $n }}{{ end -}}
{{- if .Values.database.url }}{{ $n = add1 $n }}{{ end -}}
{{- if .Values.database.postgresql.enabled }}{{ $n = add1 $n }}{{ end -}}
{{- if ne $n 1 -}}
{{- fail "database: give exactly one of database.existingSecret.name, database.url, database.postgresql.enabled=true" -}}
{{- end -}}
{{- end -}}
