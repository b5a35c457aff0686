{{/* Full name of the release's objects. */}}
{{- define "celery-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "celery-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "celery-operator.labels" -}}
{{ include "celery-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "celery-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "celery-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "celery-operator.watchNamespace" -}}
{{- default .Release.Namespace .Values.watch.namespace -}}
{{- end -}}

{{- define "celery-operator.leaderElection" -}}
{{- if or .Values.leaderElection.enabled (gt (int .Values.replicaCount) 1) -}}true{{- end -}}
{{- end -}}

{{/*
RBAC rules. They must equal what `celery-operator rbac` prints (derived from the operator's
code); the chart test (tests/chart/test.sh) compares them.
*/}}
{{- define "celery-operator.watchedRules" -}}
- apiGroups: [""]
  resources: [services]
  verbs: [create, delete, get, list, patch, watch]
- apiGroups: [""]
  resources: [pods]
  verbs: [patch]
- apiGroups: [""]
  resources: [pods/eviction]
  verbs: [create]
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [create, delete, get, list, patch, watch]
- apiGroups: [apps]
  resources: [deployments/scale]
  verbs: [get, patch]
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [create, delete, get, list, patch, watch]
- apiGroups: [celeryproject.org]
  resources: [celeries]
  verbs: [get, list, watch]
- apiGroups: [celeryproject.org]
  resources: [celeries/status]
  verbs: [patch]
- apiGroups: [celeryproject.org]
  resources: [celeries/finalizers]
  verbs: [update]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create]
- apiGroups: [keda.sh]
  resources: [scaledobjects]
  verbs: [create, delete, get, list, patch, watch]
- apiGroups: [keda.sh]
  resources: [triggerauthentications]
  verbs: [create, delete, get, list, patch, watch]
- apiGroups: [networking.k8s.io]
  resources: [ingresses]
  verbs: [create, delete, get, list, patch, watch]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [create, delete, get, list, patch, watch]
{{- end -}}

{{- define "celery-operator.operatorRules" -}}
- apiGroups: [""]
  resources: [configmaps]
  verbs: [list, watch]
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create]
{{- if include "celery-operator.leaderElection" . }}
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  verbs: [get, create, update]
{{- end }}
{{- end -}}
