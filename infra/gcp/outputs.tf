output "api_url" {
  description = "The cell's regional API (Vault's HTTP API under /v1)"
  value       = google_cloud_run_v2_service.function["api"].uri
}

output "relay_url" {
  description = "Where the relays of other cells reach this cell's relays"
  value       = google_cloud_run_v2_service.relay.uri
}

output "key_ring" {
  description = "The Cloud KMS key ring of the cell (HSM protection)"
  value       = google_kms_key_ring.cell.id
}

output "secret_events_topic" {
  description = "Name this topic in a secret's `topics` so Secret Manager's SECRET_ROTATE reaches the rotation service"
  value       = google_pubsub_topic.secret_events.id
}

output "ledger_database" {
  description = "The Firestore database holding the cell's ledger"
  value       = google_firestore_database.ledger.name
}
