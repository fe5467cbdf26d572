{{/* Names ---------------------------------------------------------------------------------- */}}

{{- define "kubeseg.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The resource name prefix: <release>-kubeseg, or <release> when it already says kubeseg. */}}
{{- define "kubeseg.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kubeseg.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Component names (each under 63 characters: the prefix is cut at 40). */}}
{{- define "kubeseg.segmentation.name" -}}{{ include "kubeseg.fullname" . }}-segmentation{{- end }}
{{- define "kubeseg.trigger.name" -}}{{ include "kubeseg.fullname" . }}-trigger{{- end }}
{{- define "kubeseg.mlflow.name" -}}{{ include "kubeseg.fullname" . }}-mlflow{{- end }}
{{- define "kubeseg.upload.name" -}}{{ include "kubeseg.fullname" . }}-pipeline-upload{{- end }}

{{- define "kubeseg.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubeseg.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Labels ---------------------------------------------------------------------------------- */}}

{{- define "kubeseg.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubeseg.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kubeseg.labels" -}}
helm.sh/chart: {{ include "kubeseg.chart" . }}
{{ include "kubeseg.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubeseg
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels and selector labels of one component: include with (dict "ctx" $ "component" "x"). */}}
{{- define "kubeseg.componentLabels" -}}
{{ include "kubeseg.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "kubeseg.componentSelectorLabels" -}}
{{ include "kubeseg.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Image ----------------------------------------------------------------------------------- */}}

{{- define "kubeseg.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "kubeseg.mlflow.image" -}}
{{- if .Values.mlflow.image.repository }}
{{- printf "%s:%s" .Values.mlflow.image.repository (required "mlflow.image.tag is required with mlflow.image.repository" .Values.mlflow.image.tag) }}
{{- else }}
{{- include "kubeseg.image" . }}
{{- end }}
{{- end }}

{{/* MLflow ---------------------------------------------------------------------------------- */}}

{{/* The tracking URI the service, the trigger and pipeline runs use. */}}
{{- define "kubeseg.mlflow.trackingUri" -}}
{{- if .Values.mlflow.enabled }}
{{- printf "http://%s.%s.svc:%d" (include "kubeseg.mlflow.name" .) .Release.Namespace (int .Values.mlflow.service.port) }}
{{- else }}
{{- required "mlflow.externalTrackingUri is required when mlflow.enabled is false" .Values.mlflow.externalTrackingUri }}
{{- end }}
{{- end }}

{{/* Pods ------------------------------------------------------------------------------------ */}}

{{- define "kubeseg.podSecurityContext" -}}
{{ toYaml .Values.podSecurityContext }}
{{- end }}

{{- define "kubeseg.securityContext" -}}
{{ toYaml .Values.securityContext }}
{{- end }}

{{- define "kubeseg.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Environment variables from a dict NAME -> value; null values are left out (the program's
     own default applies). Include with (dict "env" (dict ...)). */}}
{{- define "kubeseg.optionalEnv" -}}
{{- range $name, $value := .env }}
{{- if not (kindIs "invalid" $value) }}
- name: {{ $name }}
  value: {{ include "kubeseg.envValue" $value }}
{{- end }}
{{- end }}
{{- end }}

{{/* The projected ServiceAccount token for Kubeflow Pipelines' API (multi-user mode). */}}
{{- define "kubeseg.kfpTokenVolume" -}}
{{- if .Values.kubeflow.serviceAccountToken.enabled }}
- name: kfp-token
  projected:
    sources:
      - serviceAccountToken:
          path: token
          audience: {{ .Values.kubeflow.serviceAccountToken.audience }}
          expirationSeconds: {{ .Values.kubeflow.serviceAccountToken.expirationSeconds }}
{{- end }}
{{- end }}

{{- define "kubeseg.kfpTokenMount" -}}
{{- if .Values.kubeflow.serviceAccountToken.enabled }}
- name: kfp-token
  mountPath: /var/run/secrets/kubeflow/pipelines
  readOnly: true
{{- end }}
{{- end }}

{{- define "kubeseg.kfpTokenEnv" -}}
{{- if .Values.kubeflow.serviceAccountToken.enabled }}
- name: KF_PIPELINES_SA_TOKEN_PATH
  value: /var/run/secrets/kubeflow/pipelines/token
{{- end }}
{{- end }}

{{/* A value as a quoted environment string. Helm reads numbers as float64, which would print
     1073741824 as "1.073741824e+09": whole numbers are printed as integers. */}}
{{- define "kubeseg.envValue" -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) }}
{{- . | int64 | toString | quote }}
{{- else }}
{{- . | toString | quote }}
{{- end }}
{{- end }}

{{/* MLflow credentials of an account ("reader" or "writer") from its Secret, when auth is on. */}}
{{- define "kubeseg.mlflowCredentialsEnv" -}}
{{- $sec := .ctx.Values.security }}
{{- if $sec.auth }}
{{- $acct := index $sec.mlflow .account }}
- name: MLFLOW_TRACKING_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ required (printf "security.mlflow.%s.existingSecret is required with security.auth" .account) $acct.existingSecret }}
      key: username
- name: MLFLOW_TRACKING_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $acct.existingSecret }}
      key: password
{{- end }}
{{- end }}

{{/* Environment of the segmentation service's authentication and signature checks. */}}
{{- define "kubeseg.serviceSecurityEnv" -}}
{{- $sec := .Values.security }}
{{- if not $sec.auth }}
- name: KUBESEG_AUTH
  value: disabled
{{- else }}
{{- if $sec.service.apiKeysSecret }}
- name: KUBESEG_API_KEYS_FILE
  value: {{ printf "/etc/kubeseg/api-keys/%s" $sec.service.apiKeysKey | quote }}
{{- end }}
{{- with $sec.service.oidc }}
{{- if .jwksUrl }}
- name: KUBESEG_OIDC_JWKS_URL
  value: {{ .jwksUrl | quote }}
- name: KUBESEG_OIDC_ISSUER
  value: {{ required "security.service.oidc.issuer is required with a jwksUrl" .issuer | quote }}
- name: KUBESEG_OIDC_AUDIENCE
  value: {{ required "security.service.oidc.audience is required with a jwksUrl" .audience | quote }}
{{- end }}
{{- end }}
{{- if not (or $sec.service.apiKeysSecret $sec.service.oidc.jwksUrl) }}
{{- fail "security.auth is on: set security.service.apiKeysSecret and/or security.service.oidc.jwksUrl (or security.auth=false for development)" }}
{{- end }}
{{- end }}
{{- if not $sec.modelSigning.required }}
- name: KUBESEG_MODEL_SIGNATURES
  value: disabled
{{- else }}
- name: KUBESEG_MODEL_PUBLIC_KEY
  value: {{ printf "/etc/kubeseg/model-signing/%s" $sec.modelSigning.publicKeyKey | quote }}
{{- end }}
{{- end }}

{{- define "kubeseg.serviceSecurityMounts" -}}
{{- $sec := .Values.security }}
{{- if and $sec.auth $sec.service.apiKeysSecret }}
- name: api-keys
  mountPath: /etc/kubeseg/api-keys
  readOnly: true
{{- end }}
{{- if $sec.modelSigning.required }}
- name: model-signing
  mountPath: /etc/kubeseg/model-signing
  readOnly: true
{{- end }}
{{- end }}

{{- define "kubeseg.serviceSecurityVolumes" -}}
{{- $sec := .Values.security }}
{{- if and $sec.auth $sec.service.apiKeysSecret }}
- name: api-keys
  secret:
    secretName: {{ $sec.service.apiKeysSecret }}
    defaultMode: 0440
{{- end }}
{{- if $sec.modelSigning.required }}
- name: model-signing
  secret:
    secretName: {{ required "security.modelSigning.publicKeySecret is required when signatures are required" $sec.modelSigning.publicKeySecret }}
    defaultMode: 0444
{{- end }}
{{- end }}

{{/* Review queue and feedback store --------------------------------------------------------- */}}

{{/* Where the review volume is mounted (queue persistence), and the queue's folder. */}}
{{- define "kubeseg.review.mountPath" -}}/var/lib/kubeseg/review{{- end }}

{{- define "kubeseg.review.queueDir" -}}
{{- if .Values.segmentation.review.queue.persistence.enabled }}
{{- printf "%s/queue" (include "kubeseg.review.mountPath" .) }}
{{- else -}}
/tmp/kubeseg-review-queue
{{- end }}
{{- end }}

{{- define "kubeseg.review.claimName" -}}{{ include "kubeseg.segmentation.name" . }}-review{{- end }}

{{/* The most segmentation pods that may run at once: the HPA's maximum, or the replica count. */}}
{{- define "kubeseg.segmentation.maxReplicas" -}}
{{- $s := .Values.segmentation }}
{{- ternary $s.autoscaling.maxReplicas $s.replicaCount $s.autoscaling.enabled | int }}
{{- end }}

{{/* Refusals: a queue volume several pods cannot mount; a feedback folder on the read-only root;
     an s3:// feedback store without its Secret. */}}
{{- define "kubeseg.review.check" -}}
{{- $r := .Values.segmentation.review }}
{{- $p := $r.queue.persistence }}
{{- $n := include "kubeseg.segmentation.maxReplicas" . | int }}
{{- if and $p.enabled (gt $n 1) (not (has "ReadWriteMany" $p.accessModes)) }}
{{- fail (printf "segmentation.review.queue.persistence: up to %d segmentation pods (replicaCount, or autoscaling.maxReplicas) share one review queue, but accessModes %v has no ReadWriteMany: a ReadWriteOnce volume cannot be mounted by pods on different nodes. Use accessModes [ReadWriteMany] with a storage class that offers it, or a single replica (replicaCount 1, autoscaling off)" $n $p.accessModes) }}
{{- end }}
{{- with $r.feedbackStore }}
{{- if hasPrefix "s3://" . }}
{{- if not $r.feedbackStoreSecret }}
{{- fail "segmentation.review.feedbackStore is an s3:// store: set segmentation.review.feedbackStoreSecret to a Secret with keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (the chart never holds the key)" }}
{{- end }}
{{- else }}
{{- $path := trimPrefix "file://" . }}
{{- if contains "://" $path }}
{{- fail (printf "segmentation.review.feedbackStore %q: use s3://bucket/prefix or a folder" .) }}
{{- end }}
{{- $volume := printf "%s/" (include "kubeseg.review.mountPath" $) }}
{{- $queue := printf "%s/" (include "kubeseg.review.queueDir" $) }}
{{- $onVolume := and $p.enabled (hasPrefix $volume $path) (not (hasPrefix $queue $path)) (ne (trimSuffix "/" $path) (trimSuffix "/" $queue)) }}
{{- if not (or $onVolume (hasPrefix "/tmp/" $path)) }}
{{- fail (printf "segmentation.review.feedbackStore %q: the root filesystem is read-only; a folder store must be under %s (outside queue/, with segmentation.review.queue.persistence.enabled) or under /tmp/ (lost with the pod), or use s3://bucket/prefix" . $volume) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* The segmentation container's review environment. */}}
{{- define "kubeseg.review.env" -}}
{{- $r := .Values.segmentation.review }}
- name: KUBESEG_REVIEW_QUEUE_DIR
  value: {{ include "kubeseg.review.queueDir" . | quote }}
{{- with include "kubeseg.optionalEnv" (dict "env" (dict
      "KUBESEG_REVIEW_QUEUE_MAX" $r.queue.maxItems
      "KUBESEG_REVIEW_QUEUE_MAX_BYTES" $r.queue.maxBytes
      "KUBESEG_REVIEW_LOWEST_PERCENT" $r.rule.lowestPercent
      "KUBESEG_REVIEW_WINDOW" $r.rule.window
      "KUBESEG_REVIEW_MIN_WINDOW" $r.rule.minWindow
      "KUBESEG_REVIEW_CONFIDENCE_BELOW" $r.rule.confidenceBelow
      "KUBESEG_FEEDBACK_BATCH_SIZE" $r.feedbackBatchSize
      "KUBESEG_FEEDBACK_MIN_CORRECTED_FRACTION" $r.feedbackMinCorrectedFraction)) }}{{ . | trim | nindent 0 }}{{ end }}
{{- with $r.feedbackStore }}
- name: KUBESEG_FEEDBACK_STORE
  value: {{ . | quote }}
{{- if hasPrefix "s3://" . }}
# the feedback store's S3 key, from its Secret only (boto3 reads these)
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ $r.feedbackStoreSecret }}
      key: AWS_ACCESS_KEY_ID
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $r.feedbackStoreSecret }}
      key: AWS_SECRET_ACCESS_KEY
- name: AWS_ENDPOINT_URL
  valueFrom:
    secretKeyRef:
      name: {{ $r.feedbackStoreSecret }}
      key: AWS_ENDPOINT_URL
      optional: true
{{- with $r.feedbackStoreEndpointUrl }}
- name: AWS_ENDPOINT_URL_S3
  value: {{ . | quote }}
{{- end }}
{{- with $r.feedbackStoreRegion }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
