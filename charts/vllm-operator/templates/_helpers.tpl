{{/* The chart's name, for the app.kubernetes.io/name label. */}}
{{- define "vllm-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Name of every object; "<release>-<chart>" unless the release name already holds the chart's. */}}
{{- define "vllm-operator.fullname" -}}
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

{{/* Labels that pick the operator's Pods; never change on upgrade, so they stay selectors. */}}
{{- define "vllm-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vllm-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "vllm-operator.labels" -}}
{{ include "vllm-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: vllm-operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "vllm-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "vllm-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "vllm-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* "true" when several replicas elect a leader through a Lease, empty otherwise. */}}
{{- define "vllm-operator.replicated" -}}
{{- if gt (int .Values.replicaCount) 1 }}true{{ end }}
{{- end }}

{{/*
Where the operator works: the watched namespaces, or [""] for the whole cluster. Objects that
exist once per scope (RBAC) range over it. Returned as JSON; read with fromJsonArray.
*/}}
{{- define "vllm-operator.scopes" -}}
{{- .Values.watchNamespaces | default (list "") | toJson }}
{{- end }}

{{/*
The operator's permissions, the same in a namespace (Role) and cluster-wide (ClusterRole).
Children are written by server-side apply: a PATCH, which needs `create` too when the object
does not exist yet. Reads are watches (kopf), and a get of a child the watch has not shown yet;
the apiserver's audit log of the whole test suite shows no other read (tests/test_security.py).
*/}}
{{- define "vllm-operator.rules" -}}
# Watched; the operator writes only the status subresource.
- apiGroups: [llm.vllm-operator.io]
  resources: [llmdeployments]
  verbs: [list, watch]
- apiGroups: [llm.vllm-operator.io]
  resources: [llmdeployments/status]
  verbs: [patch]
# The built-in autoscaler (spec.autoscaling) sets replicas where kubectl scale, HPA and KEDA do.
- apiGroups: [llm.vllm-operator.io]
  resources: [llmdeployments/scale]
  verbs: [patch]
# ... and stands aside when an HPA (or KEDA's) targets the same LLMDeployment.
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [list]
# Children name their LLMDeployment with blockOwnerDeletion, which the apiserver allows only to
# whoever may update the owner's finalizers.
- apiGroups: [llm.vllm-operator.io]
  resources: [llmdeployments/finalizers]
  verbs: [update]
# The engine Deployment is deleted only when the model moves to a LeaderWorkerSet (nodesPerReplica > 1),
# and the LeaderWorkerSet when it moves back; the Service is applied, never deleted: the garbage
# collector removes the children through owner references.
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [leaderworkerset.x-k8s.io]
  resources: [leaderworkersets]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [services]
  verbs: [get, list, watch, create, patch]
# The model cache claim may hold the user's weights: deleted only when the claim was created a
# moment before for an LLMDeployment deleted meanwhile (it holds nothing yet).
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get, list, watch, create, patch, delete]
# ReplicaSets are only read, to tell the engine Deployment's Pods from others with its label.
- apiGroups: [apps]
  resources: [replicasets]
  verbs: [list, watch]
# The disruption budget is deleted when an LLMDeployment scales below 2 replicas.
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, patch, delete]
# Engine Pods: their state becomes the status, their IPs the scrape targets; a benchmark Pod's
# termination message is the benchmark's result, a model puller Pod's the outcome of its download.
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
# The log of an engine that is starting names its stage (status.startup): read only until it is Ready.
- apiGroups: [""]
  resources: [pods/log]
  verbs: [get]
# With LoRA on, an engine Pod's readiness gate (llm.vllm-operator.io/adapters-loaded) is opened once its
# engine has every adapter of spec.adapters (docs/adapters.md).
- apiGroups: [""]
  resources: [pods/status]
  verbs: [patch]
# The API key of engines with spec.apiKeySecretRef and LoRA on: adapters are loaded through the engines' API,
# which asks for it. Only the Secret the spec names is read.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
# Serving benchmarks run as Jobs, deleted once their result is in the status; so do model downloads
# (docs/cold-start.md), deleted once a later download replaced them.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, delete]
# A benchmark's full report is applied to the ConfigMap <name>-benchmark.
- apiGroups: [""]
  resources: [configmaps]
  verbs: [create, patch]
# Events are posted; a repeat within ten minutes counts up on the Event already posted.
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
{{- end }}

{{/*
Leader election: the replicas read and renew one Lease, named after the release. RBAC cannot
limit `create` by name (the object has no name until it exists), so that rule is unrestricted.
*/}}
{{- define "vllm-operator.leaseRules" -}}
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  verbs: [create]
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  resourceNames: [{{ include "vllm-operator.fullname" . }}]
  verbs: [get, update]
{{- end }}

{{/*
A Role (in a namespace) or ClusterRole (namespace "") and its binding to the operator's
ServiceAccount. Called with (dict "root" $ "namespace" ns "name" name "rules" rulesYaml).
*/}}
{{- define "vllm-operator.boundRole" -}}
{{- $kind := ternary "Role" "ClusterRole" (ne .namespace "") -}}
apiVersion: rbac.authorization.k8s.io/v1
kind: {{ $kind }}
metadata:
  name: {{ .name }}
  {{- with .namespace }}
  namespace: {{ . }}
  {{- end }}
  labels:
    {{- include "vllm-operator.labels" .root | nindent 4 }}
rules:
  {{- .rules | nindent 2 }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: {{ $kind }}Binding
metadata:
  name: {{ .name }}
  {{- with .namespace }}
  namespace: {{ . }}
  {{- end }}
  labels:
    {{- include "vllm-operator.labels" .root | nindent 4 }}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: {{ $kind }}
  name: {{ .name }}
subjects:
  - kind: ServiceAccount
    name: {{ include "vllm-operator.serviceAccountName" .root }}
    namespace: {{ .root.Release.Namespace }}
{{- end }}
