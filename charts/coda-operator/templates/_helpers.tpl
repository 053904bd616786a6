{{/* Names and labels shared by every template. */}}

{{- define "coda-operator.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "coda-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "coda-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "coda-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "coda-operator.labels" -}}
{{ include "coda-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: coda
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "coda-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "coda-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create=false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* kopf's peering name for replicaCount > 1: the release's own, never kopf's shared "default". */}}
{{- define "coda-operator.peeringName" -}}
{{- include "coda-operator.fullname" . -}}
{{- end -}}

{{- define "coda-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Namespaces that get the trainer's ServiceAccount, as a list. */}}
{{- define "coda-operator.trainerNamespaces" -}}
{{- if .Values.watchNamespaces -}}
{{- toJson .Values.watchNamespaces -}}
{{- else if .Values.trainerServiceAccount.namespaces -}}
{{- toJson .Values.trainerServiceAccount.namespaces -}}
{{- else -}}
{{- toJson (list .Release.Namespace) -}}
{{- end -}}
{{- end -}}

{{/* Rules for the namespaced objects the operator reconciles (same in a Role or a ClusterRole). */}}
{{- define "coda-operator.namespacedRules" -}}
- apiGroups: ["coda.dev"]
  resources: ["codatrainingruns"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["coda.dev"]
  resources: ["codatrainingruns/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["jobset.x-k8s.io"]
  resources: ["jobsets"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
# spec.evaluation: one evaluation Job per evaluated stage.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
# Before a stage starts: does the trainer's ServiceAccount exist? (a clear condition if not)
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["get"]
# The sampler's generated API key: created once, never read back by the operator.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["create"]
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- if gt (int .Values.replicaCount) 1 }}
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{- end -}}
