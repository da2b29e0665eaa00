/*
 * device_rights: the operational listener's ACL, held by the provisioning_guard plugin.
 *
 * One table per broker: a hash of per-device entries (username -> deny/grant topics) plus
 * the baseline patterns (%u = username, %c = client id). It is static in the .so, and
 * Mosquitto loads the plugin once per listener from the same path (dlopen returns the same
 * handle), so the server listener's instance (which takes control messages) and the
 * operational listener's (which answers checks) share it.
 *
 * File grammar (acl-operational, rendered by server/broker/acl_rules.py):
 *   # comment | pattern <access> <topic> | user <id> | topic <access> <topic>
 *   access: read, write, readwrite or deny.
 * A malformed line is skipped and logged, never fatal. A malformed `topic` line inside a
 * user block leaves that device with no rights at all (fail closed: a dropped deny line
 * must not widen its rights); `topic` lines after a malformed `user` line are skipped.
 */
#ifndef DEVICE_RIGHTS_H
#define DEVICE_RIGHTS_H

#include <stdbool.h>
#include <stddef.h>

struct mosquitto;
struct device_rights;

/* The clientId grammar (agent/protocol.py CLIENT_ID_RE). */
bool rights_valid_id(const char *id, size_t len);

/* A reference per plugin instance; the table is freed with the last one. */
void rights_retain(void);
void rights_release(void);

/* Parse ``path`` into a new table and swap it in; on a read failure the live table stays
 * and an error is returned (logged). */
int rights_load_file(const char *path);

/* MOSQ_ERR_SUCCESS or MOSQ_ERR_ACL_DENIED (MOSQ_ERR_NOMEM); ``access`` is MOSQ_ACL_READ or
 * MOSQ_ACL_WRITE. A user's deny topics first (both directions), then its grants, then the
 * patterns; `$` topics match only `$` rules; nothing matched: denied. */
int rights_check(const struct mosquitto *client, const char *topic, int access);

/* A device's replacement entry, built line by line from a control message. */
struct device_rights *rights_block_new(const char *id);
/* One "topic <access> <topic>" line (without the newline); false if malformed (the entry
 * then fails closed). */
bool rights_block_add(struct device_rights *block, const char *line);
/* Replace the device's live entry (no lines: removed, the device is back to the baseline);
 * takes ownership of ``block``. */
void rights_block_commit(struct device_rights *block);
void rights_block_free(struct device_rights *block);

/* Number of per-device entries in the live table (for the log). */
size_t rights_device_count(void);

#endif
