{{- define "neox-operator.name" -}}neox-operator{{- end }}
{{- define "neox-operator.labels" -}}
app.kubernetes.io/name: {{ include "neox-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}
{{- define "neox-operator.selector" -}}
app.kubernetes.io/name: {{ include "neox-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}
