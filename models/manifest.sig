{
 "algorithm": "Ed25519",
 "key_id": "c2e6c01e4e9a8359",
 "manifest_sha256": "7970b994085e560660dcaa9006f5726ea727c8703b4a6c9171eb23f4bc68fa82",
 "signed": "2026-12-07T13:59:48+00:00",
 "signature": "MyCRETT7EYdMXiPPoivV1F61Elge/MnGo/UR/8sFp/dagkuhOgsR44wucZmoMHdaZet7qv2IKzK9h56m3qDOAQ=="
}
