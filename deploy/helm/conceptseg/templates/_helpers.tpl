{{/* Names and labels, as `helm create` makes them. */}}
{{- define "conceptseg.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "conceptseg.fullname" -}}
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

{{- define "conceptseg.selectorLabels" -}}
app.kubernetes.io/name: {{ include "conceptseg.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "conceptseg.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "conceptseg.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* registry/repository:tag; the tag defaults to appVersion */}}
{{- define "conceptseg.image" -}}
{{- $ref := printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- if .Values.image.registry }}{{ printf "%s/%s" (trimSuffix "/" .Values.image.registry) $ref }}{{ else }}{{ $ref }}{{ end }}
{{- end }}

{{- define "conceptseg.claimName" -}}
{{- default (printf "%s-models" (include "conceptseg.fullname" .)) .Values.models.existingClaim }}
{{- end }}

{{- define "conceptseg.secretName" -}}
{{- default (printf "%s-api-key" (include "conceptseg.fullname" .)) .Values.apiKey.existingSecret }}
{{- end }}

{{/* the plans directory `build-engines` writes and `serve --plans` reads */}}
{{- define "conceptseg.plansDir" -}}
{{- printf "%s/trt-%s" .Values.plans.dir .Values.plans.precision }}
{{- end }}
