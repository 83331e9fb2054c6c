{
 "algorithm": "Ed25519",
 "key_id": "d57e1c4e34d13f89",
 "manifest_sha256": "22a36fb823aad1ea83c8d0b13506ceca80e89e6526236d354768d1bd9ef022eb",
 "signed": "2026-11-23T19:10:12+00:00",
 "signature": "4AvwDeGnhPHPXoLk2gQOvL7hqkstdg+jVmaFIT9SFwD6rsteWeo+33vcFeAGuZG3S30nkIgpt/rCjoAkVUBhDg=="
}
