/*
 * provisioning_guard: a Mosquitto 2.0 plugin (API v5) for the device-provisioning broker.
 *
 * Loaded once per listener (per_listener_settings true), with plugin_opt_listener naming it:
 *
 *   server        SUBSCRIBE is allowed only if the listener's acl_file lets the client READ
 *                 what the filter names (see subscribe_probe); the control topic.
 *   operational   the whole ACL of operational certificates: the rights table of
 *                 device_rights.c, read from plugin_opt_rights_file at start and at every
 *                 reload, and changed device by device over the control topic.
 *   provisioning  the whole ACL of birth certificates: username "CN=<id>" (the listener
 *                 sets use_subject_as_username) may write provisioning/<id>/request and
 *                 read/subscribe provisioning/<id>/response, nothing else.
 *
 * Control topic (server listener only; acl-server grants it to the server identity alone):
 *   $CONTROL/provisioning-guard/v1 (guard_control.c), payload lines "token T", "reload",
 *   "kick ID", "kick-birth ID", "stats", and rights blocks: "user ID" followed by its
 *   "topic <access> <topic>" lines (the acl-operational grammar).
 *   user      replaces device ID's entry in the rights table at once (a "user ID" with no
 *             topic lines: back to the baseline); blocks are applied before the kicks.
 *   kick      disconnects every session of username ID and CN=ID (no last will);
 *   kick-birth  only those of CN=ID (the birth certificate's sessions).
 *   reload    raises SIGHUP in the broker (it re-reads conf, ACL files, CRLs and the rights
 *             file at the top of its next loop); the kicks of the same message run in the
 *             reload event, so a kicked client can only reconnect against the new CRL.
 *   stats     answers "stats T loads=N blocks=M devices=D" (rights file reads, blocks
 *             applied, entries in the table) before "done T".
 *   When the message's work is done, "done T" is published on .../v1/response.
 *
 * Built against Debian's mosquitto-dev 2.0.11 and tested with its broker (tests/).
 */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#include "device_rights.h"
#include "guard.h"

/* The broker's own ACL check (exported by /usr/sbin/mosquitto, absent from the public
 * headers): runs the acl_file rules of the client's listener (the server listener's). */
int mosquitto_acl_check(struct mosquitto *context, const char *topic, uint32_t payloadlen,
		void *payload, uint8_t qos, bool retain, int access);

/* Stands for "any level" when a filter is checked as a topic; ACL topics never hold it
 * (acl_rules.py refuses control characters). */
#define ANY_LEVEL '\x01'

int mosquitto_plugin_version(int count, const int *versions)
{
	for(int i = 0; i < count; i++){
		if(versions[i] == 5) return 5;
	}
	return -1;
}

/* May the client read what ``filter`` names? The filter is turned into a topic with
 * ANY_LEVEL for each wildcard level and checked with the listener's READ rules: a grant
 * must cover every topic the filter can match, so "#", another device's topics and
 * "$SYS/#" fail, "devices/<own id>/commands/#" passes. "$share/<group>/<f>" is judged
 * by <f>: a device may only share what it may read anyway (its own topics), so it cannot
 * join the server's groups. Delivery is still checked message by message.
 * Returns the probe topic (malloc'd), NULL for a filter that is refused outright; sets
 * *rc to MOSQ_ERR_NOMEM when out of memory. */
static char *subscribe_probe(const char *filter, int *rc)
{
	*rc = MOSQ_ERR_ACL_DENIED;
	if(!strncmp(filter, "$share/", 7)){
		const char *slash = strchr(filter + 7, '/');
		if(slash == NULL || slash == filter + 7 || slash[1] == '\0') return NULL;
		filter = slash + 1;
	}
	size_t len = strlen(filter);
	char *probe = malloc(len + 1);
	if(probe == NULL){
		*rc = MOSQ_ERR_NOMEM;
		return NULL;
	}
	for(size_t i = 0; i < len; i++){
		char c = filter[i];
		if(c == '+' || c == '#'){
			bool whole = (i == 0 || filter[i-1] == '/') && (i + 1 == len || filter[i+1] == '/');
			if(!whole){
				free(probe);
				return NULL;
			}
			c = ANY_LEVEL;
		}
		probe[i] = c;
	}
	probe[len] = '\0';
	return probe;
}

/* Server listener: the acl_file decides publish/read (defer); SUBSCRIBE by its rules. */
static int server_check(struct mosquitto_evt_acl_check *ed)
{
	if(ed->access != MOSQ_ACL_SUBSCRIBE) return MOSQ_ERR_PLUGIN_DEFER;
	int rc;
	char *probe = subscribe_probe(ed->topic, &rc);
	if(probe == NULL) return rc;
	rc = mosquitto_acl_check(ed->client, probe, 0, NULL, ed->qos, false, MOSQ_ACL_READ);
	free(probe);
	return rc == MOSQ_ERR_SUCCESS ? MOSQ_ERR_SUCCESS : MOSQ_ERR_ACL_DENIED;
}

/* Operational listener: the rights table decides everything; never defers. */
static int operational_check(struct mosquitto_evt_acl_check *ed)
{
	if(ed->access == MOSQ_ACL_UNSUBSCRIBE) return MOSQ_ERR_SUCCESS;
	if(ed->access != MOSQ_ACL_SUBSCRIBE) return rights_check(ed->client, ed->topic, ed->access);
	int rc;
	char *probe = subscribe_probe(ed->topic, &rc);
	if(probe == NULL) return rc;
	rc = rights_check(ed->client, probe, MOSQ_ACL_READ);
	free(probe);
	return rc;
}

/* Birth certificates: username "CN=<id>" (a subject with only a CN, as the station signs). */
static int provisioning_check(struct mosquitto_evt_acl_check *ed)
{
	const char *user = mosquitto_client_username(ed->client);
	if(user == NULL || strncmp(user, "CN=", 3) || !rights_valid_id(user + 3, strlen(user + 3))){
		return MOSQ_ERR_ACL_DENIED;
	}
	if(ed->access == MOSQ_ACL_UNSUBSCRIBE) return MOSQ_ERR_SUCCESS;
	char allowed[MAX_ID + 32];
	const char *suffix = ed->access == MOSQ_ACL_WRITE ? "request" : "response";
	snprintf(allowed, sizeof(allowed), "provisioning/%s/%s", user + 3, suffix);
	return strcmp(ed->topic, allowed) ? MOSQ_ERR_ACL_DENIED : MOSQ_ERR_SUCCESS;
}

static int on_acl_check(int event, void *event_data, void *userdata)
{
	struct guard *guard = userdata;
	struct mosquitto_evt_acl_check *ed = event_data;
	(void)event;

	switch(guard->mode){
		case MODE_PROVISIONING: return provisioning_check(ed);
		case MODE_OPERATIONAL: return operational_check(ed);
		default: return server_check(ed);
	}
}

/* Operational listener: the whole rights file again. The new table is built fully and then
 * swapped in; if the file cannot be read the old table stays (logged). */
static int on_rights_reload(int event, void *event_data, void *userdata)
{
	struct guard *guard = userdata;
	(void)event;
	(void)event_data;

	if(rights_load_file(guard->rights_file) == MOSQ_ERR_SUCCESS) guard_file_loads++;
	return MOSQ_ERR_PLUGIN_DEFER;
}

static void guard_free(struct guard *guard)
{
	guard_clear_pending(guard);
	free(guard->rights_file);
	free(guard);
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **user_data,
		struct mosquitto_opt *options, int option_count)
{
	struct guard *guard = calloc(1, sizeof(*guard));
	if(guard == NULL) return MOSQ_ERR_NOMEM;
	guard->pid = identifier;
	const char *listener = NULL, *rights_file = NULL;
	for(int i = 0; i < option_count; i++){
		if(!strcmp(options[i].key, "listener")) listener = options[i].value;
		if(!strcmp(options[i].key, "rights_file")) rights_file = options[i].value;
	}
	if(listener && !strcmp(listener, "server")){
		guard->mode = MODE_SERVER;
	}else if(listener && !strcmp(listener, "operational")){
		guard->mode = MODE_OPERATIONAL;
	}else if(listener && !strcmp(listener, "provisioning")){
		guard->mode = MODE_PROVISIONING;
	}else{
		mosquitto_log_printf(MOSQ_LOG_ERR,
				"provisioning_guard: plugin_opt_listener must be server, operational or provisioning");
		free(guard);
		return MOSQ_ERR_INVAL;
	}
	rights_retain();
	*user_data = guard;
	if(guard->mode == MODE_OPERATIONAL){
		/* Its whole ACL: refuse to start without it rather than deny every device. */
		if(rights_file == NULL || (guard->rights_file = strdup(rights_file)) == NULL
				|| rights_load_file(rights_file) != MOSQ_ERR_SUCCESS){
			mosquitto_log_printf(MOSQ_LOG_ERR,
					"provisioning_guard: the operational listener needs a readable plugin_opt_rights_file");
			return MOSQ_ERR_INVAL; /* Mosquitto stops; plugin_cleanup frees the guard */
		}
		guard_file_loads++;
	}
	int rc = mosquitto_callback_register(identifier, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, guard);
	if(rc == MOSQ_ERR_SUCCESS && guard->mode == MODE_OPERATIONAL){
		rc = mosquitto_callback_register(identifier, MOSQ_EVT_RELOAD, on_rights_reload, NULL, guard);
	}
	if(rc == MOSQ_ERR_SUCCESS && guard->mode == MODE_SERVER){
		rc = mosquitto_callback_register(identifier, MOSQ_EVT_CONTROL, guard_on_control, CONTROL_TOPIC, guard);
		if(rc == MOSQ_ERR_SUCCESS){
			rc = mosquitto_callback_register(identifier, MOSQ_EVT_RELOAD, guard_on_reload, NULL, guard);
		}
	}
	mosquitto_log_printf(MOSQ_LOG_INFO, "provisioning_guard: loaded for the %s listener", listener);
	return rc;
}

int mosquitto_plugin_cleanup(void *user_data, struct mosquitto_opt *options, int option_count)
{
	struct guard *guard = user_data;
	(void)options;
	(void)option_count;

	if(guard == NULL) return MOSQ_ERR_SUCCESS;
	mosquitto_callback_unregister(guard->pid, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
	if(guard->mode == MODE_SERVER){
		mosquitto_callback_unregister(guard->pid, MOSQ_EVT_CONTROL, guard_on_control, CONTROL_TOPIC);
		mosquitto_callback_unregister(guard->pid, MOSQ_EVT_RELOAD, guard_on_reload, NULL);
	}
	if(guard->mode == MODE_OPERATIONAL){
		mosquitto_callback_unregister(guard->pid, MOSQ_EVT_RELOAD, on_rights_reload, NULL);
	}
	guard_free(guard);
	rights_release();
	return MOSQ_ERR_SUCCESS;
}
