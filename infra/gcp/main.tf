# One Keycell cell on GCP: the regional API, rotation and revocation as Cloud Run
# services, keys in Cloud KMS at protection level HSM, the ledger in Firestore,
# Secret Manager rotation notices on Pub/Sub pushed to the rotation service, and the
# relays as a Cloud Run service that never scales to zero.

locals {
  prefix = "${var.deployment_name}-${var.cell_id}"
  ledger = "${local.prefix}-ledger"
  common_env = {
    KEYCELL_CELL             = var.cell_id
    KEYCELL_LEDGER           = "firestore://${var.project}/${local.ledger}/ledger"
    KEYCELL_KEY_BACKEND      = "gcp-kms"
    KEYCELL_GCP_KMS_KEY_RING = google_kms_key_ring.cell.id
    KEYCELL_SEAL             = "hsm"
    KEYCELL_AUDIT_STDOUT     = "1"
  }
  # The API is `keycell server`; the event services' commands come from the rotation and
  # revocation work (variables, so they follow it without editing this module). Cloud Run
  # serves the API's URL over HTTPS only and terminates TLS in front of the container, so
  # the container's own listener is plain HTTP (`--tls-disable`; keycell server refuses a
  # cleartext listener off loopback without it).
  functions = {
    api        = ["keycell", "server", "--listen", "0.0.0.0:8080", "--tls-disable"]
    rotation   = var.rotation_command
    revocation = var.revocation_command
  }
}

data "google_project" "this" {
  project_id = var.project
}

# --- keys ---------------------------------------------------------------------------

resource "google_kms_key_ring" "cell" {
  project  = var.project
  name     = "${local.prefix}-keys"
  location = var.region
}

# Encrypts the cell's own stores (Firestore, Pub/Sub) at rest.
resource "google_kms_crypto_key" "storage" {
  name            = "${local.prefix}-storage"
  key_ring        = google_kms_key_ring.cell.id
  purpose         = "ENCRYPT_DECRYPT"
  rotation_period = var.key_rotation_period

  version_template {
    algorithm        = "GOOGLE_SYMMETRIC_ENCRYPTION"
    protection_level = "HSM"
  }

  lifecycle {
    prevent_destroy = true
  }
}

resource "google_kms_crypto_key_iam_member" "storage_firestore" {
  crypto_key_id = google_kms_crypto_key.storage.id
  role          = "roles/cloudkms.cryptoKeyEncrypterDecrypter"
  member        = "serviceAccount:service-${data.google_project.this.number}@gcp-sa-firestore.iam.gserviceaccount.com"
}

resource "google_kms_crypto_key_iam_member" "storage_pubsub" {
  crypto_key_id = google_kms_crypto_key.storage.id
  role          = "roles/cloudkms.cryptoKeyEncrypterDecrypter"
  member        = "serviceAccount:service-${data.google_project.this.number}@gcp-sa-pubsub.iam.gserviceaccount.com"
}

# --- ledger -------------------------------------------------------------------------

# Transactions give the conditional writes (read version, write if unchanged); the TTL
# policy on expires_at removes expired items (the ledger treats them as absent before).
resource "google_firestore_database" "ledger" {
  project                           = var.project
  name                              = local.ledger
  location_id                       = var.region
  type                              = "FIRESTORE_NATIVE"
  concurrency_mode                  = "PESSIMISTIC"
  point_in_time_recovery_enablement = "POINT_IN_TIME_RECOVERY_ENABLED"
  delete_protection_state           = "DELETE_PROTECTION_ENABLED"
  deletion_policy                   = "ABANDON"

  cmek_config {
    kms_key_name = google_kms_crypto_key.storage.id
  }

  depends_on = [google_kms_crypto_key_iam_member.storage_firestore]
}

resource "google_firestore_field" "ledger_ttl" {
  project    = var.project
  database   = google_firestore_database.ledger.name
  collection = "ledger"
  field      = "expires_at"

  ttl_config {}
  index_config {}
}

# --- identities ---------------------------------------------------------------------

resource "google_service_account" "function" {
  for_each     = local.functions
  project      = var.project
  account_id   = "${local.prefix}-${each.key}"
  display_name = "Keycell ${each.key} of cell ${var.cell_id}"
}

resource "google_service_account" "relay" {
  project      = var.project
  account_id   = "${local.prefix}-relay"
  display_name = "Keycell relay of cell ${var.cell_id}"
}

resource "google_service_account" "pubsub_push" {
  project      = var.project
  account_id   = "${local.prefix}-push"
  display_name = "Pub/Sub pushes to the rotation and revocation services of cell ${var.cell_id}"
}

locals {
  ledger_users = merge(
    { for name, sa in google_service_account.function : name => sa.email },
    { relay = google_service_account.relay.email },
  )
}

# Firestore access is granted per project; the condition keeps it to this cell's database.
resource "google_project_iam_member" "ledger" {
  for_each = local.ledger_users
  project  = var.project
  role     = "roles/datastore.user"
  member   = "serviceAccount:${each.value}"

  condition {
    title      = "only-${local.ledger}"
    expression = "resource.name.startsWith(\"projects/${var.project}/databases/${local.ledger}\")"
  }
}

# The cell keeps its own keys in the ring (adapters/keys/gcp_kms.py creates them by
# name, as HSM keys: the barrier's seal key, transit keys, identity signing keys) and
# runs their lifecycle: new versions, primary changes, disable, destroy (crypto-shredding).
# This role holds what that adapter calls and nothing else: no IAM changes, no key ring
# creation (Terraform makes the ring), no import. Granted on this ring only.
resource "google_project_iam_custom_role" "cell_keys" {
  project = var.project
  role_id = replace("${local.prefix}_cell_keys", "-", "_")
  title   = "Keycell cell ${var.cell_id}: its keys in its ring"
  permissions = [
    "cloudkms.keyRings.get",
    "cloudkms.cryptoKeys.create",
    "cloudkms.cryptoKeys.get",
    "cloudkms.cryptoKeys.update",
    "cloudkms.cryptoKeyVersions.create",
    "cloudkms.cryptoKeyVersions.get",
    "cloudkms.cryptoKeyVersions.list",
    "cloudkms.cryptoKeyVersions.update",
    "cloudkms.cryptoKeyVersions.destroy",
    "cloudkms.cryptoKeyVersions.useToEncrypt",
    "cloudkms.cryptoKeyVersions.useToDecrypt",
    "cloudkms.cryptoKeyVersions.useToSign",
    "cloudkms.cryptoKeyVersions.viewPublicKey",
  ]
}

resource "google_kms_key_ring_iam_member" "cell_keys" {
  for_each    = local.ledger_users
  key_ring_id = google_kms_key_ring.cell.id
  role        = google_project_iam_custom_role.cell_keys.id
  member      = "serviceAccount:${each.value}"
}

# --- Secret Manager rotation notices ------------------------------------------------

resource "google_pubsub_topic" "secret_events" {
  project      = var.project
  name         = "${local.prefix}-secret-events"
  kms_key_name = google_kms_crypto_key.storage.id

  message_retention_duration = "604800s"
  depends_on                 = [google_kms_crypto_key_iam_member.storage_pubsub]
}

resource "google_pubsub_topic" "revocations" {
  project      = var.project
  name         = "${local.prefix}-revocations"
  kms_key_name = google_kms_crypto_key.storage.id

  message_retention_duration = "604800s"
  depends_on                 = [google_kms_crypto_key_iam_member.storage_pubsub]
}

resource "google_pubsub_topic" "dead_letters" {
  project      = var.project
  name         = "${local.prefix}-dead-letters"
  kms_key_name = google_kms_crypto_key.storage.id
  depends_on   = [google_kms_crypto_key_iam_member.storage_pubsub]
}

# Secret Manager publishes SECRET_ROTATE (and the other notices) of secrets that name
# this topic in their `topics`.
resource "google_pubsub_topic_iam_member" "secret_manager_publishes" {
  project = var.project
  topic   = google_pubsub_topic.secret_events.name
  role    = "roles/pubsub.publisher"
  member  = "serviceAccount:service-${data.google_project.this.number}@gcp-sa-secretmanager.iam.gserviceaccount.com"
}

resource "google_pubsub_subscription" "rotation" {
  project              = var.project
  name                 = "${local.prefix}-rotation"
  topic                = google_pubsub_topic.secret_events.id
  ack_deadline_seconds = 60
  filter               = "attributes.eventType = \"SECRET_ROTATE\""

  push_config {
    push_endpoint = "${google_cloud_run_v2_service.function["rotation"].uri}/pubsub"
    oidc_token {
      service_account_email = google_service_account.pubsub_push.email
    }
  }

  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.dead_letters.id
    max_delivery_attempts = 10
  }

  retry_policy {
    minimum_backoff = "10s"
    maximum_backoff = "600s"
  }
}

resource "google_pubsub_subscription" "revocation" {
  project              = var.project
  name                 = "${local.prefix}-revocation"
  topic                = google_pubsub_topic.revocations.id
  ack_deadline_seconds = 60

  push_config {
    push_endpoint = "${google_cloud_run_v2_service.function["revocation"].uri}/pubsub"
    oidc_token {
      service_account_email = google_service_account.pubsub_push.email
    }
  }

  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.dead_letters.id
    max_delivery_attempts = 10
  }
}

# --- functions (Cloud Run) ----------------------------------------------------------

resource "google_cloud_run_v2_service" "function" {
  for_each            = local.functions
  project             = var.project
  name                = "${local.prefix}-${each.key}"
  location            = var.region
  deletion_protection = true
  # The API serves Vault clients (behind its own tokens); the event functions only Pub/Sub pushes.
  ingress = each.key == "api" ? "INGRESS_TRAFFIC_ALL" : "INGRESS_TRAFFIC_INTERNAL_ONLY"

  template {
    service_account                  = google_service_account.function[each.key].email
    max_instance_request_concurrency = 80
    timeout                          = "30s"

    scaling {
      min_instance_count = each.key == "api" ? 1 : 0
      max_instance_count = var.api_max_instances
    }

    vpc_access {
      connector = var.vpc_connector
      egress    = "ALL_TRAFFIC"
    }

    containers {
      image   = var.image
      command = each.value

      dynamic "env" {
        for_each = local.common_env
        content {
          name  = env.key
          value = env.value
        }
      }

      ports {
        container_port = 8080
      }

      resources {
        limits = {
          cpu    = "1"
          memory = "1Gi"
        }
      }

      startup_probe {
        http_get {
          path = "/v1/sys/health"
        }
      }
    }
  }
}

resource "google_cloud_run_v2_service_iam_member" "push" {
  for_each = toset(["rotation", "revocation"])
  project  = var.project
  location = var.region
  name     = google_cloud_run_v2_service.function[each.key].name
  role     = "roles/run.invoker"
  member   = "serviceAccount:${google_service_account.pubsub_push.email}"
}

resource "google_cloud_run_v2_service_iam_member" "api" {
  for_each = toset(var.api_invokers)
  project  = var.project
  location = var.region
  name     = google_cloud_run_v2_service.function["api"].name
  role     = "roles/run.invoker"
  member   = each.value
}

# --- relays (Cloud Run, always on) ----------------------------------------------------

resource "google_cloud_run_v2_service" "relay" {
  project             = var.project
  name                = "${local.prefix}-relay"
  location            = var.region
  deletion_protection = true
  ingress             = "INGRESS_TRAFFIC_ALL" # relays of other cells; mutual TLS with SPIFFE identities

  template {
    service_account = google_service_account.relay.email
    # Gossip needs the processes running between requests.
    annotations = {
      "run.googleapis.com/cpu-throttling" = "false"
    }

    scaling {
      min_instance_count = var.relays
      max_instance_count = var.relays
    }

    vpc_access {
      connector = var.vpc_connector
      egress    = "ALL_TRAFFIC"
    }

    containers {
      image   = var.image
      command = ["keycell", "relay"]

      dynamic "env" {
        for_each = merge(local.common_env, {
          KEYCELL_RELAY_LISTEN  = "0.0.0.0:${var.relay_port}"
          KEYCELL_RELAY_PEERS   = join(",", var.relay_peers)
          KEYCELL_RELAY_PROFILE = "wan"
        })
        content {
          name  = env.key
          value = env.value
        }
      }

      # mTLS between relays (keycell/relay/tls.py), when relay_tls_secret names the secrets
      dynamic "env" {
        for_each = var.relay_tls_secret == "" ? {} : {
          KEYCELL_RELAY_TLS_CERT = "${var.relay_tls_secret}-cert"
          KEYCELL_RELAY_TLS_KEY  = "${var.relay_tls_secret}-key"
          KEYCELL_RELAY_TLS_CA   = "${var.relay_tls_secret}-ca"
        }
        content {
          name = env.key
          value_source {
            secret_key_ref {
              secret  = env.value
              version = "latest"
            }
          }
        }
      }

      ports {
        name           = "h2c" # gRPC end to end
        container_port = var.relay_port
      }

      resources {
        cpu_idle = false
        limits = {
          cpu    = "1"
          memory = "1Gi"
        }
      }
    }
  }
}
